"""The Velesio mesh protocol (VMP/2), shared by the router and the worker. See docs/protocol.md."""
