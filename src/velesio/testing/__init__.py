"""Test helpers (public): run a backend in-process, without a router or a worker (``run_backend``), and drive
the router's scheduler with a fake mesh of workers and a fake clock (``FakeMesh``, in ``velesio.testing.mesh``).

See docs/plugins.md, "Testing a backend without a mesh".
"""

from __future__ import annotations

from velesio.testing.backend import BackendRun, load_backend, run_backend
from velesio.testing.mesh import FakeClock, FakeMesh

__all__ = ["BackendRun", "FakeClock", "FakeMesh", "load_backend", "run_backend"]
