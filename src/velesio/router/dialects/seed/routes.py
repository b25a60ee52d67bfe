"""The seed's and OpenAI's text routes. POST /completion is shared with llama.cpp's dialect: a body that
uses a field only llama.cpp knows is answered by dialects/llamacpp (``llamacpp.wants``)."""

from __future__ import annotations

import json

from aiohttp import web

from ... import admission
from ...keys import SCHEDULER
from ...relay import respond
from ...validation import read_body, read_json
from .. import llamacpp
from ..base import Dialect
from . import openai


async def completion(request: web.Request) -> web.StreamResponse:
    """POST /completion (and /completions, llama.cpp's alias of it): the seed's shape, or llama.cpp's when the
    body uses llama.cpp fields."""
    body = await read_json(request)
    if llamacpp.wants(body):
        return await llamacpp.completion(request, body)
    return await v1_completion(request, body)


async def v1_completion(request: web.Request, body: dict | None = None) -> web.StreamResponse:
    body = await read_json(request) if body is None else body
    admitted = await admission.admit(request, openai.parse_completion(body))
    return await respond(request, admitted, openai.OpenAIText(admitted.job, usage_chunk=openai.include_usage(body)))


async def v1_completions(request: web.Request) -> web.StreamResponse:
    return await v1_completion(request)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    admitted = await admission.admit(request, openai.parse_chat(body))
    return await respond(request, admitted, openai.OpenAIText(admitted.job, usage_chunk=openai.include_usage(body)))


async def v1_models(request: web.Request) -> web.Response:
    return web.json_response(openai.models_list(request.app[SCHEDULER].live_models()))


async def sniff(request: web.Request) -> Dialect | None:
    """/completion serves two dialects; an error raised before the handler read the body (401, 429) still
    gets llama.cpp's shape when the body is llama.cpp's (LLM for Unity v3 reads ``code`` as an int)."""
    if request.path not in ("/completion", "/completions") or (request.content_length or 0) > 2**20:
        return None
    try:
        body = json.loads(await read_body(request))
    except Exception:  # noqa: BLE001 - any body that is not JSON keeps the seed's shape
        return None
    return llamacpp.DIALECT if isinstance(body, dict) and llamacpp.wants(body) else None
