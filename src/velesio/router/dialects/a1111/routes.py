"""The AUTOMATIC1111 API (``/sdapi/v1/*``) on the mesh: txt2img and img2img as image jobs, the model,
sampler, option and progress endpoints A1111 clients (``webuiapi``) call, and empty answers to the
start-up probes for features we do not have (scripts, LoRAs, upscalers, ...). See docs/images.md,
"The A1111 API".

Errors on these paths have the seed's shape plus a top-level ``detail`` (dialects/a1111). Auth is
the router's (Bearer, or HTTP Basic with the token as password, which is what ``webuiapi`` sends).

Per-caller state lives here, in the router process, and is not persisted:

- options (``POST /sdapi/v1/options``): with ``router.options_scope: token`` (the default) stored per token
  name, so one caller's ``sd_model_checkpoint`` is that caller's default image model and nobody else's;
  with ``global`` one set for everyone, as a single A1111 server has.
- the caller's image jobs, so that ``/progress`` reports and ``/interrupt`` stops the caller's own jobs
  only (never another token's).
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import logging
import os
import time
from typing import Any

from aiohttp import web

from velesio import __version__
from velesio.mesh import protocol
from velesio.mesh.jobs import Job
from velesio.mesh.params import ImageParams, ImageResult

from ... import admission, aliases
from ...errors import ApiError, invalid
from ...keys import CONFIG, SCHEDULER, TOKEN_NAME
from ...relay import dumps, result_of
from ...validation import get_int, get_str, read_json
from . import models as a1111_models
from . import parse as a1111
from . import render

log = logging.getLogger("velesio.router")

PREFIX = "/sdapi/v1"


@dataclasses.dataclass
class Tracked:
    """An image job of one caller, from submission until its HTTP request ends."""

    token: str
    job: Job
    started: float
    job_timestamp: str
    interrupted: bool = False


class A1111State:
    def __init__(self, scope: str):
        self.scope = "global" if scope == "global" else "token"
        self.options: dict[str, dict[str, Any]] = {}
        self.jobs: dict[str, Tracked] = {}

    def key(self, request: web.Request) -> str:
        return "*" if self.scope == "global" else str(request.get(TOKEN_NAME) or "anonymous")

    def options_of(self, request: web.Request) -> dict[str, Any]:
        return self.options.get(self.key(request), {})

    def jobs_of(self, request: web.Request) -> list[Tracked]:
        token = str(request.get(TOKEN_NAME) or "anonymous")
        return sorted((t for t in self.jobs.values() if t.token == token), key=lambda t: t.started)


STATE = web.AppKey("a1111_state", A1111State)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=dumps)


def _image_models(request: web.Request) -> dict[str, dict[str, Any]]:
    live = request.app[SCHEDULER].live_models()
    return {name: m for name, m in sorted(live.items())
            if m.get("kind") == "image" or set(m.get("operations") or ()) & set(protocol.IMAGE_OPERATIONS)}


def _default_model(request: web.Request, models: dict[str, dict[str, Any]]) -> str | None:
    """The caller's default image model: its stored option, else the router's default, else the first
    live image model that does txt2img."""
    stored = request.app[STATE].options_of(request).get("sd_model_checkpoint")
    if stored:
        return str(stored)
    configured = request.app[CONFIG].default_image_model
    if configured:
        return configured
    for name, m in models.items():
        if "txt2img" in (m.get("operations") or ()):
            return name
    return next(iter(models), None)


def _pick_model(request: web.Request, requested: str, field: str, op: str = "txt2img") -> str:
    """A model a client names (name, title, file name or hash, or a ``router.model_aliases`` name) → its
    name; 404 ``model_not_found`` when nobody offers it, as for text models."""
    models = _image_models(request)
    name = a1111_models.match_model(requested, models)
    if name is not None:
        return name
    scheduler = request.app[SCHEDULER]
    alias = aliases.resolve(request.app[CONFIG].model_aliases, requested, op, scheduler.live_models(),
                            scheduler.known_models)
    if alias != requested and alias is not None:
        return a1111_models.match_model(alias, models) or alias
    if requested in scheduler.known_models or not scheduler.workers:
        return requested  # seen before (its worker may be restarting) or no workers yet: let the scheduler wait
    titles = a1111_models.titles(models)
    raise ApiError("model_not_found", f"{field}: no live image model matches {requested!r}; available: "
                                      f"{', '.join(titles.values()) or 'none'}",
                   {"available": list(titles.values())}, param=field)


# ---- txt2img / img2img ------------------------------------------------------------------------------
async def _generate(request: web.Request, op: str) -> web.Response:
    body = await read_json(request)
    state = request.app[STATE]
    options = state.options_of(request)
    if op == "img2img" and body.get("init_images"):
        req = await asyncio.to_thread(a1111.parse, op, body, options)  # decodes the images
    else:
        req = a1111.parse(op, body, options)
    requested = _pick_model(request, req.model, req.model_field, op) if req.model else None
    if requested is None:
        models = _image_models(request)
        default = _default_model(request, models)
        requested = (a1111_models.match_model(default, models) or default) if default else None
    job = Job(op=op, model=requested or "", params=req.params)
    admitted = await admission.admit(request, job)
    a1111_models.resolve_samplers(req, job.model, admitted.meta)
    tracked = Tracked(token=str(request.get(TOKEN_NAME) or "anonymous"), job=job, started=time.time(),
                      job_timestamp=req.job_timestamp)
    state.jobs[job.id] = tracked
    try:
        try:
            result = await result_of(request, admitted)
        except ApiError as err:
            if err.code == "cancelled" and tracked.interrupted:
                result = render.empty_result()
            else:
                raise
    finally:
        state.jobs.pop(job.id, None)
    assert isinstance(result, ImageResult)
    response = _json(render.render(req, result, job.model, admitted.meta))
    response.headers["X-Request-Id"] = job.id  # the id the logs name the job by, as on the text routes
    return response


async def txt2img(request: web.Request) -> web.Response:
    return await _generate(request, "txt2img")


async def img2img(request: web.Request) -> web.Response:
    return await _generate(request, "img2img")


# ---- progress, interrupt, skip ---------------------------------------------------------------------
async def progress(request: web.Request) -> web.Response:
    """The caller's oldest image job that is running (else its oldest queued one); idle otherwise."""
    scheduler = request.app[SCHEDULER]
    mine = [t for t in request.app[STATE].jobs_of(request) if t.job.id in scheduler.jobs]
    if not mine:
        return _json(render.progress_body(None, None, None, None))
    running = [t for t in mine if scheduler.jobs[t.job.id].worker is not None]
    current = (running or mine)[0]
    rec = scheduler.jobs[current.job.id]
    ahead = 0
    if rec.worker is None:
        queue = scheduler.queues.get(current.job.model) or ()
        ahead = next((i for i, r in enumerate(queue) if r is rec), 0)
    params = current.job.params
    assert isinstance(params, ImageParams)
    return _json(render.progress_body(current.job.op, params, rec.progress or None, current.started,
                                      current.job_timestamp, current.interrupted, ahead))


async def interrupt(request: web.Request) -> web.Response:
    """Stop the caller's running image jobs; each request returns what was done, ``interrupted: true``.
    Queued jobs are left to run, as in A1111 (an interrupt ends the current job)."""
    scheduler = request.app[SCHEDULER]
    for tracked in request.app[STATE].jobs_of(request):
        rec = scheduler.jobs.get(tracked.job.id)
        if rec is not None and rec.worker is not None and not rec.done:
            tracked.interrupted = True
            scheduler.cancel(rec, keep=True)
    return _json({})


async def skip(request: web.Request) -> web.Response:
    """A1111 skips the image in progress; a mesh job cannot drop one image, so this does nothing."""
    return _json({})


# ---- models, samplers, options -------------------------------------------------------------------
async def sd_models(request: web.Request) -> web.Response:
    models = _image_models(request)
    titles = a1111_models.titles(models)
    return _json([a1111_models.sd_model_entry(name, titles[name], m.get("meta") or {}) for name, m in models.items()])


async def samplers(request: web.Request) -> web.Response:
    return _json(a1111_models.samplers_of(_image_models(request), "samplers"))


async def schedulers(request: web.Request) -> web.Response:
    return _json(a1111_models.samplers_of(_image_models(request), "schedulers"))


async def get_options(request: web.Request) -> web.Response:
    state = request.app[STATE]
    stored = state.options_of(request)
    models = _image_models(request)
    current = _default_model(request, models)
    titles = a1111_models.titles(models)
    meta = (models.get(current or "") or {}).get("meta") or {}
    body = {**a1111.OPTION_DEFAULTS, **stored,
            "sd_model_checkpoint": titles.get(current or "", current),
            "sd_checkpoint_hash": meta.get("sha256") or a1111_models.model_hash(meta)}
    return _json(body)


async def set_options(request: web.Request) -> web.Response:
    body = await read_json(request, allow_empty=True)
    state = request.app[STATE]
    update: dict[str, Any] = {}
    if "sd_model_checkpoint" in body:
        requested = get_str(body, "sd_model_checkpoint", allow_empty=False)
        name = a1111_models.match_model(requested, _image_models(request))
        if name is None:
            titles = list(a1111_models.titles(_image_models(request)).values())
            raise ApiError("invalid_request", f"sd_model_checkpoint: no live image model matches {requested!r}; "
                                              f"available: {', '.join(titles) or 'none'}",
                           {"available": titles}, param="sd_model_checkpoint")
        update["sd_model_checkpoint"] = name
    if "CLIP_stop_at_last_layers" in body:
        update["CLIP_stop_at_last_layers"] = get_int(body, "CLIP_stop_at_last_layers", 1, lo=1, hi=12)
    for fmt_key in ("samples_format", "grid_format"):
        if body.get(fmt_key) not in (None, "png"):
            raise invalid(fmt_key, "only png is supported")
    for key, value in body.items():
        if key in update or key == "sd_checkpoint_hash":
            continue
        if not isinstance(key, str) or len(key) > 128:
            continue
        if isinstance(value, str) and len(value) > 4096:
            raise invalid(key, "value too long (at most 4096 characters)")
        if not isinstance(value, (str, int, float, bool, type(None))):
            if len(dumps(value)) > 4096:
                raise invalid(key, "value too large")
        update[key] = value
    stored = state.options.setdefault(state.key(request), {})
    if len(set(stored) | set(update)) > a1111.MAX_STORED_OPTIONS:
        raise ApiError("invalid_request", f"at most {a1111.MAX_STORED_OPTIONS} options can be stored")
    stored.update(update)
    if "sd_model_checkpoint" in update:
        log.info("a1111 options (%s scope): sd_model_checkpoint = %s", state.scope, update["sd_model_checkpoint"])
    return _json(None)


# ---- small endpoints and start-up probes ---------------------------------------------------------------
async def png_info(request: web.Request) -> web.Response:
    """The generation parameters stored in a PNG's ``parameters`` text chunk (ours and A1111's)."""
    body = await read_json(request)
    data = await asyncio.to_thread(a1111.decode_image, body.get("image"), "image")
    try:
        from PIL import Image
    except ImportError:
        raise ApiError("not_supported", "png-info needs Pillow on the router (pip install pillow)") from None
    with Image.open(io.BytesIO(data)) as img:
        items = {str(k): v for k, v in (img.info or {}).items() if isinstance(v, str)}
    text = items.pop("parameters", "")
    return _json({"info": text, "items": items, "parameters": {}})


async def memory(request: web.Request) -> web.Response:
    ram: dict[str, Any] = {}
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        free = page * os.sysconf("SC_AVPHYS_PAGES")
        ram = {"free": free, "used": total - free, "total": total}
    except (ValueError, OSError, AttributeError):
        ram = {"error": "not available on this host"}
    workers = [{"worker": w.name, "device": w.caps.get("device"), "memory_total_mb": w.caps.get("memory_total_mb"),
                "memory_free_mb": w.caps.get("memory_free_mb")}
               for w in request.app[SCHEDULER].workers.values() if "image" in w.kinds]
    return _json({"ram": ram, "cuda": {"error": "the router has no GPU; see workers"}, "workers": workers})


async def cmd_flags(request: web.Request) -> web.Response:
    return _json({"api": True, "nowebui": True, "api_auth": bool(request.app[CONFIG].tokens),
                  "server": f"velesio {__version__}"})


async def scripts(request: web.Request) -> web.Response:
    return _json({"txt2img": [], "img2img": []})


async def embeddings(request: web.Request) -> web.Response:
    return _json({"loaded": {}, "skipped": {}})


async def refresh(request: web.Request) -> web.Response:
    return _json(None)  # the model list is always live (workers announce their models)


async def empty_list(request: web.Request) -> web.Response:
    return _json([])


async def not_supported(request: web.Request) -> web.Response:
    raise ApiError("not_supported", f"{request.path[len(PREFIX) + 1:]} is not supported by this server")


def setup(app: web.Application) -> None:
    scope = app[CONFIG].options_scope
    if scope not in ("token", "global"):
        log.warning("router.options_scope %r is not 'token' or 'global'; using 'token'", scope)
    app[STATE] = A1111State(scope)


ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "txt2img", txt2img),
    ("POST", "img2img", img2img),
    ("GET", "progress", progress),
    ("POST", "interrupt", interrupt),
    ("POST", "skip", skip),
    ("GET", "sd-models", sd_models),
    ("GET", "samplers", samplers),
    ("GET", "schedulers", schedulers),
    ("GET", "options", get_options),
    ("POST", "options", set_options),
    ("POST", "png-info", png_info),
    ("GET", "memory", memory),
    ("GET", "cmd-flags", cmd_flags),
    ("GET", "scripts", scripts),
    ("GET", "embeddings", embeddings),
    ("POST", "refresh-checkpoints", refresh),
    *(("GET", name, empty_list) for name in (
        "upscalers", "latent-upscale-modes", "sd-vae", "sd-modules", "loras", "prompt-styles", "script-info",
        "hypernetworks", "face-restorers", "realesrgan-models", "extensions")),
    *(("POST", name, not_supported) for name in ("interrogate", "extra-single-image", "extra-batch-images")),
]
