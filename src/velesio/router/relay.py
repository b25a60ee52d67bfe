"""Runs one admitted job (router/admission.py) for an HTTP handler: submit, then answer whole or as SSE.

A stream writes exactly one SSE event per ``write()`` (one HTTP chunk each), with no comments or
keep-alive lines, because LLM for Unity v3 parses every network chunk as one JSON object.

A stream's response starts with the job's first event (its first piece, or its end): an error known before
generation starts (a prompt longer than the context, a grammar that does not compile, ...) is answered
with its HTTP status and error body, as llama.cpp does, not with 200 and an error event. The first piece is
written as soon as it arrives, so time to first token is unchanged; only the headers wait for it."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Protocol

from aiohttp import web

from velesio.mesh.params import Result, result_from_wire

from .admission import Admitted
from .errors import ApiError, context_exceeded
from .keys import RATE_HEADERS, SCHEDULER
from .scheduler import JobRecord


class Renderer(Protocol):
    """How a dialect answers one job: whole (``render``) or as a stream of SSE events."""

    done_marker: bool  # end a stream with ``data: [DONE]``

    def render(self, result: Any) -> dict[str, Any]: ...
    def start(self) -> list[dict[str, Any]]: ...
    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]: ...
    def end(self, result: Any) -> list[dict[str, Any]]: ...
    def error(self, err: ApiError) -> list[dict[str, Any]]: ...


try:  # optional (pip install orjson): the same compact UTF-8 JSON several times faster
    import orjson

    HAVE_ORJSON = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_ORJSON = False

_ORJSON_OPTS = orjson.OPT_NON_STR_KEYS if HAVE_ORJSON else 0


def dumps_bytes(obj: Any) -> bytes:
    """Compact JSON as UTF-8 bytes. With orjson installed it writes the same JSON text as ``json.dumps``
    but for two corners: a float exponent has no leading zero (``2e-7`` for ``2e-07``) and NaN or infinity
    is ``null`` (``json`` writes ``NaN``, which is not JSON). What orjson refuses (integers beyond 64 bits,
    lone surrogates, nesting deeper than 255) goes through ``json``, so what succeeds or fails is unchanged."""
    if HAVE_ORJSON:
        try:
            return orjson.dumps(obj, option=_ORJSON_OPTS)
        except TypeError:
            pass
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def dumps(obj: Any) -> str:
    return dumps_bytes(obj).decode()


def json_response(obj: Any, *, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    """``web.json_response`` with the body encoded once, straight to bytes."""
    return web.Response(body=dumps_bytes(obj), status=status, content_type="application/json", charset="utf-8",
                        headers=headers)


def sse(event: Any) -> bytes:
    """One SSE event: ``data: <json>`` and a blank line."""
    return b"data: " + dumps_bytes(event) + b"\n\n"


def _submit(request: web.Request, admitted: Admitted) -> JobRecord:
    return request.app[SCHEDULER].submit(admitted.job, tenant=admitted.tenant, priority=admitted.priority,
                                         weight=admitted.weight)


def _result(rec: JobRecord, payload: dict[str, Any]) -> Result:
    return result_from_wire(rec.job.op, payload)


def _job_error(admitted: Admitted, err: ApiError) -> ApiError:
    """A job's error as the client gets it: with the job id the logs name it by, and a context error with
    the counts llama.cpp reports."""
    err.headers.setdefault("X-Request-Id", admitted.job.id)
    n_ctx = admitted.meta.get("n_ctx")
    return context_exceeded(err, n_ctx if isinstance(n_ctx, int) else None)


async def result_of(request: web.Request, admitted: Admitted) -> Result:
    """Run an admitted job to its end and return its result (raises ApiError on a job error)."""
    rec = _submit(request, admitted)
    try:
        while True:
            kind, payload = await rec.events.get()
            if kind == "final":
                return _result(rec, payload)
            if kind == "error":
                raise _job_error(admitted, payload)
    finally:
        if not rec.done:  # the client went away (handler cancelled)
            request.app[SCHEDULER].cancel(rec)


async def _open_stream(request: web.Request, job_id: str, first: list[dict[str, Any]]) -> web.StreamResponse:
    """Send a stream's status line and headers, then its ``first`` events."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no", "X-Request-Id": job_id,
                                           **request.get(RATE_HEADERS, {})})
    await response.prepare(request)
    for event in first:
        await response.write(sse(event))
    return response


async def respond(request: web.Request, admitted: Admitted, renderer: Renderer) -> web.StreamResponse:
    job = admitted.job
    if not job.stream:
        result = await result_of(request, admitted)
        return json_response(renderer.render(result), headers={"X-Request-Id": job.id})
    scheduler = request.app[SCHEDULER]
    rec = _submit(request, admitted)
    try:
        kind, payload = await rec.events.get()  # the first piece, or the end: an error is still an HTTP status
        if kind == "error":
            raise _job_error(admitted, payload)
        response = await _open_stream(request, job.id, renderer.start())
        while True:
            if kind == "partial":
                events = renderer.chunk(payload)
            elif kind == "final":
                events = renderer.end(_result(rec, payload))
            else:
                events = renderer.error(_job_error(admitted, payload))
            for event in events:
                await response.write(sse(event))
            if kind != "partial":
                break
            kind, payload = await rec.events.get()
        if renderer.done_marker:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass  # the client is gone; the finally clause cancels the job
    finally:
        if not rec.done:
            scheduler.cancel(rec)
    return response


# ---- several jobs for one request ---------------------------------------------------------------------
class ChoicesRenderer(Protocol):
    """How a dialect answers a request that became several jobs (``n`` > 1, a list of prompts): job ``i``'s
    events and result go to it with ``i``; ``finish`` adds what follows them all (a usage chunk)."""

    done_marker: bool

    def render(self, results: list[Any]) -> Any: ...
    def start(self) -> list[dict[str, Any]]: ...
    def chunk(self, i: int, chunk: dict[str, Any]) -> list[dict[str, Any]]: ...
    def end(self, i: int, result: Any) -> list[dict[str, Any]]: ...
    def finish(self, results: list[Any]) -> list[dict[str, Any]]: ...
    def error(self, err: ApiError) -> list[dict[str, Any]]: ...


async def respond_choices(request: web.Request, admitted: list[Admitted],
                          renderer: ChoicesRenderer) -> web.StreamResponse:
    """Run several admitted jobs of one request side by side and answer them as one response: whole, or one
    SSE stream whose events interleave as the jobs produce them. The first error ends the request (the other
    jobs are cancelled): before the stream starts it is the HTTP status, after it an error event."""
    scheduler = request.app[SCHEDULER]
    recs = [_submit(request, a) for a in admitted]
    merged: asyncio.Queue[tuple[int, str, Any]] = asyncio.Queue()

    async def forward(i: int, rec: JobRecord) -> None:
        while True:
            kind, payload = await rec.events.get()
            await merged.put((i, kind, payload))
            if kind != "partial":
                return

    forwarders = [asyncio.create_task(forward(i, rec)) for i, rec in enumerate(recs)]
    results: list[Any] = [None] * len(recs)
    left = len(recs)
    response: web.StreamResponse | None = None
    try:
        while left:
            i, kind, payload = await merged.get()
            if kind == "error":
                err = _job_error(admitted[i], payload)
                if response is None:
                    raise err
                for event in renderer.error(err):
                    await response.write(sse(event))
                break
            if kind == "final":
                results[i] = _result(recs[i], payload)
                left -= 1
            if not admitted[0].job.stream:
                continue
            if response is None:
                response = await _open_stream(request, admitted[0].job.id, renderer.start())
            events = renderer.chunk(i, payload) if kind == "partial" else renderer.end(i, results[i])
            for event in events:
                await response.write(sse(event))
        if response is None:
            return json_response(renderer.render(results), headers={"X-Request-Id": admitted[0].job.id})
        if not left:
            for event in renderer.finish(results):
                await response.write(sse(event))
            if renderer.done_marker:
                await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except (ConnectionResetError, ConnectionError):
        pass  # the client is gone; the finally clause cancels the jobs
    finally:
        for task in forwarders:
            task.cancel()
        for rec in recs:
            if not rec.done:
                scheduler.cancel(rec)
    assert response is not None
    return response
