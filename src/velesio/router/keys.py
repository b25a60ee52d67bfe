"""Typed keys of the router's aiohttp application state."""

from __future__ import annotations

from aiohttp import web

from velesio.config import RouterConfig

from .broker import Broker
from .scheduler import Scheduler

CONFIG = web.AppKey("config", RouterConfig)
SCHEDULER = web.AppKey("scheduler", Scheduler)
BROKER = web.AppKey("broker", Broker)
STARTED = web.AppKey("started", float)

# Per-request state set by the middlewares.
TOKEN_NAME = web.RequestKey("token_name", str)  # the caller's token name (never the token)
RATE_HEADERS = web.RequestKey("rate_headers", dict)  # X-RateLimit-* headers for this request
