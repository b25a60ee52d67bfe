"""``velesio-worker``: load backends and models, join the mesh, serve jobs until SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from velesio import config as mesh_config
from velesio import loop as event_loop
from velesio.logs import setup_logging
from velesio.mesh import curve
from velesio.plugins.discovery import describe, discover

from . import cpu
from .models import discover_backends, start_models
from .runtime import Worker

log = logging.getLogger("velesio.worker")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="velesio-worker", description=__doc__)
    p.add_argument("--router", action="append", help="router mesh address, e.g. tcp://HOST:5555 (repeatable)")
    p.add_argument("--config", help="mesh.yaml (default: $VELESIO_CONFIG; none: serve the embedded models)")
    p.add_argument("--name", help="worker name shown by the router (default: host name)")
    p.add_argument("--list-backends", action="store_true", help="list discovered backends and exit")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-json", action="store_true", help="JSON lines logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.log_level, json_lines=args.log_json)
    if args.list_backends:
        for line in describe(discover()):
            print(line)
        return 0
    try:
        cfg = mesh_config.load(args.config).worker
    except mesh_config.ConfigError as exc:
        print(f"velesio-worker: {exc}", file=sys.stderr)
        return 2
    routers = args.router or cfg.routers
    try:
        link_security = curve.client_from_config(cfg.curve)
        if link_security is not None and len(link_security.server_publics) not in (1, len(routers)):
            raise curve.CurveError(f"worker.curve.router_public_key: {len(link_security.server_publics)} keys for "
                                   f"{len(routers)} routers; give one key for all, or one per router in their order")
    except curve.CurveError as exc:
        print(f"velesio-worker: {exc}", file=sys.stderr)
        return 2
    if link_security is None:
        log.warning("mesh link is plain TCP (no worker.curve in the config): for a single trusted host only")
    registry = cpu.HostRegistry()
    try:
        registry.join()
    except OSError as exc:
        log.warning("cannot register in %s (%s): this worker's CPU share ignores other workers on the host",
                    registry.folder, exc)
    worker = Worker(name=args.name or cfg.name, heartbeat_ms=cfg.heartbeat_ms, liveness=cfg.liveness,
                    drain_s=cfg.drain_s, partial_window_ms=cfg.partial_window_ms, curve=link_security,
                    registry=registry, memory_budget_mb=cfg.memory_budget_mb, cancel_grace_s=cfg.cancel_grace_s,
                    log_level=args.log_level, log_json=args.log_json)
    try:
        return event_loop.run(_serve(worker, cfg, routers, args))
    finally:
        registry.leave()


async def _serve(worker: Worker, cfg: mesh_config.WorkerConfig, routers: list[str], args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    backends, failures = discover_backends()
    try:
        models, more = await start_models(cfg.models, worker, cancel_grace_s=cfg.cancel_grace_s,
                                          log_level=args.log_level, log_json=args.log_json, threads=worker.threads,
                                          budget_mb=cfg.memory_budget_mb, backends=backends)
    except ValueError as exc:
        print(f"velesio-worker: {exc}", file=sys.stderr)
        return 2
    failures += more
    worker.serve_models(models, failures, backends)
    served = ", ".join(f"{m.config.name} ({m.config.backend}, {m.config.slots} slot(s))" for m in models)
    print(f"velesio-worker {worker.name}: serving {served or 'nothing'}"
          f"{f'; {len(failures)} failure(s), see log' if failures else ''}; routers {', '.join(routers)}",
          flush=True)
    if stop.is_set():  # stopped while the models were loading
        await asyncio.gather(*(m.process.stop() for m in models))
        return 0
    await worker.serve(routers, stop)
    log.info("worker %s stopped after %d job(s)", worker.name, worker.jobs_done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
