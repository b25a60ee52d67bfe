"""``velesio-router``: the aiohttp application, its mesh broker, and the command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator

from aiohttp import web

from velesio import config as mesh_config
from velesio import loop as event_loop
from velesio.logs import setup_logging
from velesio.mesh import curve

from . import admin_routes, dashboard_routes, dialects, http_server, metrics, middleware, status_routes
from .broker import Broker
from .errors import ApiError
from .keys import BROKER, CONFIG, SCHEDULER, STARTED
from .ratelimit import RATE_LIMITER, RateLimiter
from .scheduler import Scheduler

log = logging.getLogger("velesio.router")


def init_app(cfg: mesh_config.RouterConfig) -> web.Application:
    app = web.Application(
        client_max_size=int(cfg.max_body_mb * 2**20),
        middlewares=[metrics.metrics_middleware, middleware.errors_middleware, middleware.cors_middleware,
                     middleware.auth_middleware])
    app[CONFIG] = cfg
    app[STARTED] = time.time()
    app[RATE_LIMITER] = RateLimiter(cfg.rate_limit, cfg.token_limits)
    broker = Broker(cfg.mesh_bind, curve=curve.server_from_config(cfg.curve))
    app[BROKER] = broker
    app[SCHEDULER] = Scheduler(broker.send, queue_max=cfg.queue_max, heartbeat_ms=cfg.heartbeat_ms,
                               liveness=cfg.liveness, job_stall_s=cfg.job_stall_s,
                               worker_wait_s=cfg.worker_wait_s, router_name=socket.gethostname(),
                               job_crash_limit=cfg.job_crash_limit, aging_s=cfg.queue_aging_s,
                               routing=cfg.routing, affinity_imbalance=cfg.affinity_imbalance,
                               default_models={"text": cfg.default_text_model, "image": cfg.default_image_model})
    dialects.setup(app)
    for module in (status_routes, metrics, dashboard_routes, admin_routes):
        module.setup(app)
    app.cleanup_ctx.append(_mesh)
    return app


async def _mesh(app: web.Application) -> AsyncIterator[None]:
    broker = app[BROKER]
    await broker.start(app[SCHEDULER])
    yield
    await broker.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="velesio-router", description=__doc__)
    p.add_argument("--config", help="mesh.yaml (default: $VELESIO_CONFIG)")
    p.add_argument("--host", help="HTTP bind address (default 0.0.0.0)")
    p.add_argument("--port", type=int, help="HTTP port (default 8000)")
    p.add_argument("--mesh-bind", help="ZeroMQ ROUTER bind address (default tcp://0.0.0.0:5555)")
    p.add_argument("--no-auth", action="store_true", help="serve without API tokens (trusted networks only)")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-json", action="store_true", help="JSON lines logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, json_lines=args.log_json)
    try:
        cfg = mesh_config.load(args.config).router
    except mesh_config.ConfigError as exc:
        print(f"velesio-router: {exc}", file=sys.stderr)
        return 2
    cfg.host = args.host or cfg.host
    cfg.port = args.port or cfg.port
    cfg.mesh_bind = args.mesh_bind or cfg.mesh_bind
    if not cfg.tokens and not args.no_auth:
        print("velesio-router: no API tokens configured; set API_TOKENS=token1,token2 (environment or .env), "
              "router.tokens in mesh.yaml, or pass --no-auth on a trusted network", file=sys.stderr)
        return 2
    if args.no_auth:
        cfg.tokens = {}
        log.warning("authentication is OFF (--no-auth): anyone who can reach %s:%s can use the mesh",
                    cfg.host, cfg.port)
    try:
        app = init_app(cfg)
    except curve.CurveError as exc:
        print(f"velesio-router: {exc}", file=sys.stderr)
        return 2
    event_loop.run(_serve(app, cfg))
    return 0


async def _serve(app: web.Application, cfg: mesh_config.RouterConfig) -> None:
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    # Header lines up to 64 KB reach the middlewares (and get a JSON 401/400); slow heads, idle connections
    # and the parser's own refusals are router/http_server.py's.
    listener = await http_server.listen(runner, cfg.host, cfg.port, header_timeout=cfg.header_timeout_s,
                                        handler_kwargs={"access_log": None, "max_line_size": 65536,
                                                        "max_field_size": 65536,
                                                        "keepalive_timeout": cfg.keepalive_s})
    log.info("velesio-router listening on http://%s:%s (%d token(s))", cfg.host, cfg.port, len(cfg.tokens))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    scheduler = app[SCHEDULER]
    log.info("shutting down: %d job(s) in flight get %.0fs to finish", len(scheduler.jobs), cfg.drain_s)
    scheduler.accepting = False
    deadline = time.monotonic() + cfg.drain_s
    while scheduler.jobs and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if scheduler.jobs:
        scheduler.abort_all(ApiError("shutting_down", "the router is shutting down; retry shortly",
                                     headers={"Retry-After": "5"}))
        await asyncio.sleep(0.2)  # let the streams write their final event
    listener.close()
    await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
