"""Text routes in the seed's and OpenAI's shapes."""

from __future__ import annotations

from aiohttp import web

from .dialects import llamacpp, openai
from .keys import SCHEDULER
from .relay import respond
from .validation import read_json


async def completion(request: web.Request) -> web.StreamResponse:
    """POST /completion: the seed's shape, or llama.cpp's when the body uses llama.cpp fields."""
    body = await read_json(request)
    if llamacpp.wants(body):
        return await llamacpp.completion(request, body)
    job = openai.parse_completion(body)
    return await respond(request, job, openai.OpenAIText(job, usage_chunk=openai.include_usage(body)))


async def v1_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    job = openai.parse_completion(body)
    return await respond(request, job, openai.OpenAIText(job, usage_chunk=openai.include_usage(body)))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    job = openai.parse_chat(body)
    return await respond(request, job, openai.OpenAIText(job, usage_chunk=openai.include_usage(body)))


async def v1_models(request: web.Request) -> web.Response:
    return web.json_response(openai.models_list(request.app[SCHEDULER].live_models()))


def setup(app: web.Application) -> None:
    app.router.add_post("/completion", completion)
    app.router.add_post("/completions", v1_completions)
    app.router.add_post("/v1/completions", v1_completions)
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", v1_models)
