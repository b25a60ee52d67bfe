"""Velesio mesh: text and image generation served from a pool of workers over ZeroMQ."""

__version__ = "0.1.0"
