"""The benchmark suite: ``python -m bench`` (``make bench``). It starts real router and worker processes on
loopback and measures them with a load generator in separate processes. See docs/performance.md."""
