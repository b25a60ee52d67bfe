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
