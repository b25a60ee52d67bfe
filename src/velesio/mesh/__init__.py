"""The Velesio mesh protocol (VMP/1), shared by the router and the worker. See docs/protocol.md."""
