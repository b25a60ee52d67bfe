"""GET /health, /models and /queue/status: the seed's shapes, built from what workers advertise."""

from __future__ import annotations

import datetime

from aiohttp import web

from velesio import __version__

from .dialects.seed import openai
from .keys import SCHEDULER


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


async def health(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    workers = list(scheduler.workers.values())
    kinds = {kind for w in workers for kind in w.kinds}
    failures = [{"worker": w.name, **f} for w in workers for f in w.caps.get("failures") or []]
    restarting = [{"worker": w.name, "model": m} for w in workers for m in w.models if w.state(m) == "restarting"]
    text_ready = "ready" if "text" in kinds else "unavailable"
    image_ready = "ready" if "image" in kinds else "unavailable"
    body = {
        # degraded: no worker, no model, some backend/model failed to load (see "failures"), or some model's
        # backend process is restarting after a crash (see "restarting")
        "status": "healthy" if kinds and not failures and not restarting else "degraded",
        "timestamp": _now(),
        "version": __version__,
        "services": {"mesh": "listening" if scheduler.accepting else "draining",
                     "llm_worker": text_ready, "sd_worker": image_ready},
        "workers": [w.summary() for w in workers],
        "failures": failures,
        "restarting": restarting,
    }
    return web.json_response(body)


async def models(request: web.Request) -> web.Response:
    live = request.app[SCHEDULER].live_models()
    text, image = [], []
    for name, m in sorted(live.items()):
        meta = m.get("meta") or {}
        # loaded: in memory on some worker (a model every worker put to sleep, keep_alive, loads on its next job)
        entry = {"name": name, "loaded": m["awake"] > 0, "backend": m.get("backend"), "workers": m["workers"],
                 "slots": m["slots_total"], "free_slots": m["slots_free"], "operations": m.get("operations", [])}
        if m.get("kind") == "image":
            image.append({**entry, "type": meta.get("type", "checkpoint")})
        else:
            text.append({**entry, "size": meta.get("size", ""), "type": meta.get("type", "chat"),
                         "context_length": meta.get("n_ctx")})
    # The reference's two lists, and OpenAI's (and llama.cpp's) {"object": "list", "data"} for their clients.
    return web.json_response({"text_models": text, "image_models": image, **openai.models_list(live)})


async def queue_status(request: web.Request) -> web.Response:
    scheduler = request.app[SCHEDULER]
    running = sum(len(w.running) for w in scheduler.workers.values())
    return web.json_response({
        "queue_depth": scheduler.queue_depth(),
        "active_workers": len(scheduler.workers),
        "pending_jobs": scheduler.queue_depth() + running,
        "running_jobs": running,
        "completed_jobs_24h": scheduler.completed_24h(),
        "queues": {model: len(q) for model, q in scheduler.queues.items() if q},
        "workers": [w.summary() for w in scheduler.workers.values()],
    })


def setup(app: web.Application) -> None:
    app.router.add_route("GET", "/health", health)
    app.router.add_route("POST", "/health", health)
    app.router.add_get("/v1/health", health)
    app.router.add_get("/models", models)
    app.router.add_get("/queue/status", queue_status)
