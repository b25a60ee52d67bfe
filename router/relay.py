"""Runs one job for an HTTP handler: resolve the model, submit, then answer whole or as SSE.

A stream writes exactly one SSE event per ``write()`` (one HTTP chunk each), with no comments or
keep-alive lines, because LLM for Unity v3 parses every network chunk as one JSON object."""

from __future__ import annotations

import json
from typing import Any, Protocol

from aiohttp import web

from velesio.mesh.jobs import Job

from . import admission
from .errors import ApiError
from .keys import SCHEDULER
from .scheduler import JobRecord


class Renderer(Protocol):
    done_marker: bool

    def render(self, result: dict[str, Any]) -> dict[str, Any]: ...
    def start(self) -> list[dict[str, Any]]: ...
    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]: ...
    def end(self, result: dict[str, Any]) -> list[dict[str, Any]]: ...
    def error(self, err: ApiError) -> list[dict[str, Any]]: ...


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


async def submit(request: web.Request, job: Job) -> JobRecord:
    scheduler = request.app[SCHEDULER]
    job.model = await scheduler.resolve_model(job.op, job.model or None)
    admission.check(job, scheduler.model_info(job.model) or {})
    return scheduler.submit(job)


async def result_of(request: web.Request, job: Job) -> dict[str, Any]:
    """Run a job to its end and return its result (raises ApiError on a job error)."""
    rec = await submit(request, job)
    try:
        while True:
            kind, payload = await rec.events.get()
            if kind == "final":
                return payload
            if kind == "error":
                raise payload
    finally:
        if not rec.done:  # the client went away (handler cancelled)
            request.app[SCHEDULER].cancel(rec)


async def respond(request: web.Request, job: Job, renderer: Renderer) -> web.StreamResponse:
    if not job.stream:
        result = await result_of(request, job)
        return web.json_response(renderer.render(result), dumps=dumps, headers={"X-Request-Id": job.id})
    rec = await submit(request, job)
    scheduler = request.app[SCHEDULER]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", "X-Request-Id": job.id,
                                           **request.get("rate_headers", {})})
    try:
        await response.prepare(request)
        for event in renderer.start():
            await response.write(f"data: {dumps(event)}\n\n".encode())
        while True:
            kind, payload = await rec.events.get()
            if kind == "partial":
                events = renderer.chunk(payload)
            elif kind == "final":
                events = renderer.end(payload)
            else:
                events = renderer.error(payload)
            for event in events:
                await response.write(f"data: {dumps(event)}\n\n".encode())
            if kind != "partial":
                break
        if renderer.done_marker:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass  # the client is gone; the finally clause cancels the job
    finally:
        if not rec.done:
            scheduler.cancel(rec)
    return response
