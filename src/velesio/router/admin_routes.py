"""The operator API: each worker's models, memory and backend processes; load, unload and resize models on a
running worker (docs/deployment.md "Admin API", docs/protocol.md "Models at run time").

Its own scope: admin tokens (``router.admin_tokens``, ``ADMIN_TOKENS``), checked by router/middleware.py
``admin_auth``; an API token is refused, and with no admin token configured every route answers 403. Errors
have the seed's shape. A change waits for the worker's REPLY (up to ``?wait=`` seconds, default 600); one
still under way after that is answered 202, and GET /admin/workers shows how it ends."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

from aiohttp import web

from velesio.mesh import messages, protocol
from velesio.mesh.protocol import Command

from .errors import ApiError, invalid
from .keys import SCHEDULER, TOKEN_NAME
from .records import WorkerState
from .scheduler import Scheduler

log = logging.getLogger("velesio.router")

WAIT_S = 600.0  # how long a change waits for its worker by default (a large model loads in minutes)
MAX_WAIT_S = 3600.0
LOAD_KEYS = frozenset({"name", "backend", "path", "embedded", "slots", "options", "max_job_s", "max_memory_mb",
                       "keep_alive", "size_mb"})  # a model entry of mesh.yaml (worker/models.py checks them)
STATUS_KEYS = ("pid", "memory_mb", "memory_limit_mb", "size_mb", "keep_alive_s", "idle_s", "crashes", "restarts",
               "last_crash", "max_job_s")


def model_view(w: WorkerState, name: str) -> dict[str, Any]:
    """One model of a worker: what it offers, its slots (free as this router counts them) and its process."""
    m = w.models.get(name, {})
    status = w.backends.get(name, {})
    return {"name": name, "state": status.get("state", "ready"), "backend": m.get("backend"), "kind": m.get("kind"),
            "operations": m.get("operations", []), "slots": m.get("slots"),
            "free": w.free(name) if name in w.models else 0,
            **{key: status.get(key) for key in STATUS_KEYS}}


def worker_view(w: WorkerState) -> dict[str, Any]:
    caps = w.caps
    loading = sorted(n for n, b in w.backends.items() if n not in w.models and b.get("state") == "loading")
    # What its models take by their estimates: every one with a process, or loading one.
    committed = sum(int(b.get("size_mb") or 0) for b in w.backends.values() if b.get("state") != "sleeping")
    return {
        "id": w.name,
        "identity": w.identity.decode(errors="replace"),
        "version": w.version,
        "models_at_run_time": supports_changes(w),
        "host": caps.get("host"),
        "device": caps.get("device"),
        "memory_total_mb": caps.get("memory_total_mb"),
        "memory_free_mb": caps.get("memory_free_mb"),
        "memory_budget_mb": caps.get("memory_budget_mb"),
        "models_mb": committed,
        "draining": w.draining,
        "jobs_in_flight": len(w.running),
        "jobs_done": w.jobs_done,
        "heartbeat_age_s": round(w.clock() - w.last_seen, 3),
        "models": [model_view(w, n) for n in sorted(w.models)] + [model_view(w, n) for n in loading],
        "failures": caps.get("failures") or [],
    }


def supports_changes(w: WorkerState) -> bool:
    return protocol.version_tuple(w.version) >= protocol.MODELS_AT_RUN_TIME


def find_worker(scheduler: Scheduler, key: str) -> WorkerState:
    """A live worker by name (or by its mesh identity, when several share a name)."""
    named = [w for w in scheduler.workers.values() if w.name == key]
    if not named:
        named = [w for w in scheduler.workers.values() if w.identity.decode(errors="replace") == key]
    if not named:
        raise ApiError("not_found", f"no live worker named '{key}'",
                       {"workers": sorted({w.name for w in scheduler.workers.values()})})
    if len(named) > 1:
        raise ApiError("conflict", f"{len(named)} live workers are named '{key}'; name one by its identity",
                       {"identities": sorted(w.identity.decode(errors="replace") for w in named)})
    return named[0]


def _changeable(scheduler: Scheduler, key: str) -> WorkerState:
    w = find_worker(scheduler, key)
    if not supports_changes(w):
        wanted = ".".join(map(str, protocol.MODELS_AT_RUN_TIME))
        raise ApiError("not_supported", f"worker {w.name} speaks mesh protocol {w.version}; changing its models at "
                                        f"run time needs {wanted} or later (upgrade velesio on that worker)")
    return w


def _wait_s(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return WAIT_S
    try:
        wait = float(raw)
    except ValueError:
        raise invalid("wait", f"a number of seconds, not {raw!r}") from None
    if not 0 <= wait <= MAX_WAIT_S:
        raise invalid("wait", f"from 0 to {MAX_WAIT_S:g} seconds, not {raw}")
    return wait


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise ApiError("invalid_request", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "the body must be a JSON object")
    return body


async def _ask(request: web.Request, w: WorkerState, command: Command, body: dict[str, Any],
               what: str) -> dict[str, Any] | None:
    """Send a change to its worker and wait for the REPLY: its body when it succeeded, None when it is still
    under way after ``?wait=``; ApiError when it failed."""
    scheduler = request.app[SCHEDULER]
    wait = _wait_s(request)
    log.info("admin %s: %s on worker %s", request[TOKEN_NAME], what, w.name)
    future = scheduler.command_worker(w, command, body)
    if wait > 0:
        # Not wait_for: a client that goes away, or the wait running out, leaves the change to finish.
        done, _ = await asyncio.wait({future}, timeout=wait)
        if done:
            reply = future.result()
            if not reply.get("ok"):
                code = str(reply.get("code") or "internal_error")
                details = reply.get("details") if isinstance(reply.get("details"), dict) else None
                log.warning("admin %s: %s on worker %s refused: %s", request[TOKEN_NAME], what, w.name,
                            reply.get("message"))
                raise ApiError(code, str(reply.get("message") or code), details)
            return reply
    return None


def _accepted(w: WorkerState, what: str) -> web.Response:
    return web.json_response({"worker": w.name, "status": "in_progress",
                              "message": f"{what} is still under way on worker {w.name}; GET /admin/workers shows "
                                         "when it is done"}, status=202)


async def list_workers(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    workers = sorted(scheduler.workers.values(), key=lambda w: (w.name, w.identity))
    return web.json_response({"workers": [worker_view(w) for w in workers]})


async def get_worker(request: web.Request) -> web.Response:
    return web.json_response(worker_view(find_worker(request.app[SCHEDULER], request.match_info["worker"])))


async def load_model(request: web.Request) -> web.Response:
    w = _changeable(request.app[SCHEDULER], request.match_info["worker"])
    entry = await _json_object(request)
    for key in ("name", "backend"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise invalid(key, "a model needs a name and a backend (strings)")
    unknown = set(entry) - LOAD_KEYS
    if unknown:
        raise ApiError("invalid_request", f"unknown key(s) {', '.join(sorted(unknown))} (a model takes: "
                                          f"{', '.join(sorted(LOAD_KEYS))})")
    name = entry["name"]
    what = f"loading model {name}"
    reply = await _ask(request, w, Command.LOAD, dict(messages.load(uuid.uuid4().hex, entry)), what)
    if reply is None:
        return _accepted(w, what)
    return web.json_response({"worker": w.name, "model": model_view(w, name)}, status=201)


def _flag(request: web.Request, key: str) -> bool:
    raw = request.query.get(key, "0").lower()
    if raw not in ("0", "1", "true", "false", "yes", "no", ""):
        raise invalid(key, f"1 or 0, not {raw!r}")
    return raw in ("1", "true", "yes")


async def unload_model(request: web.Request) -> web.Response:
    w = _changeable(request.app[SCHEDULER], request.match_info["worker"])
    name, move = request.match_info["model"], _flag(request, "move")
    if name not in w.models:
        raise ApiError("model_not_found", f"worker {w.name} serves no model named '{name}'",
                       {"models": sorted(w.models)})
    what = f"unloading model {name}{' (moving its jobs)' if move else ''}"
    reply = await _ask(request, w, Command.UNLOAD, dict(messages.unload(uuid.uuid4().hex, name, move)), what)
    if reply is None:
        return _accepted(w, what)
    return web.json_response({"worker": w.name, "model": name, "unloaded": True, "moved": int(reply.get("moved") or 0)})


async def update_model(request: web.Request) -> web.Response:
    w = _changeable(request.app[SCHEDULER], request.match_info["worker"])
    name = request.match_info["model"]
    body = await _json_object(request)
    unknown = set(body) - {"slots", "keep_alive"}
    if unknown or not body:
        raise ApiError("invalid_request", "a model's change takes slots and/or keep_alive"
                                          + (f", not {', '.join(sorted(unknown))}" if unknown else ""))
    slots = body.get("slots")
    if "slots" in body and (isinstance(slots, bool) or not isinstance(slots, int) or slots < 1):
        raise invalid("slots", f"a whole number >= 1, not {slots!r}")
    keep = body.get("keep_alive")
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, (int, float)) or keep <= 0):
        raise invalid("keep_alive", f"a number of seconds > 0, or null (never unload when idle), not {keep!r}")
    if name not in w.models:
        raise ApiError("model_not_found", f"worker {w.name} serves no model named '{name}'",
                       {"models": sorted(w.models)})
    what = f"changing model {name} ({', '.join(f'{k} {v}' for k, v in body.items())})"
    change = messages.update(uuid.uuid4().hex, name, slots=slots, keep_alive=keep, set_keep_alive="keep_alive" in body)
    reply = await _ask(request, w, Command.UPDATE, dict(change), what)
    if reply is None:
        return _accepted(w, what)
    return web.json_response({"worker": w.name, "model": model_view(w, name)})


def setup(app: web.Application) -> None:
    app.router.add_get("/admin/workers", list_workers)
    app.router.add_get("/admin/workers/{worker}", get_worker)
    app.router.add_post("/admin/workers/{worker}/models", load_model)
    app.router.add_delete("/admin/workers/{worker}/models/{model}", unload_model)
    app.router.add_patch("/admin/workers/{worker}/models/{model}", update_model)
