"""The seed's and OpenAI's text routes. POST /completion is shared with llama.cpp's dialect: a body that
uses a field only llama.cpp knows is answered by dialects/llamacpp (``llamacpp.wants``); any other gets the
seed's shape with llama.cpp's keys beside it (seed/both.py)."""

from __future__ import annotations

import json

from aiohttp import web

from velesio.mesh.jobs import Job
from velesio.mesh.params import TemplateParams, TemplateResult, TextParams, TokenizeParams, TokenizeResult

from ... import admission
from ...keys import SCHEDULER
from ...relay import Renderer, respond, respond_choices, result_of
from ...validation import read_body, read_json
from .. import llamacpp
from ..base import Dialect
from . import openai
from .both import BothShapes


async def completion(request: web.Request) -> web.StreamResponse:
    """POST /completion (and /completions, llama.cpp's alias of it): the seed's shape, or llama.cpp's when the
    body uses llama.cpp fields."""
    body = await read_json(request)
    if llamacpp.wants(body):
        return await llamacpp.completion(request, body)
    return await v1_completion(request, body, both=True)


async def v1_completion(request: web.Request, body: dict | None = None, both: bool = False) -> web.StreamResponse:
    body = await read_json(request) if body is None else body
    job = openai.parse_completion(body)
    prompts = openai.completion_prompts(body)
    return await _answer(request, body, job, prompts, admission.choices_per_prompt(body, len(prompts)), both)


async def v1_completions(request: web.Request) -> web.StreamResponse:
    return await v1_completion(request)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    job = openai.parse_chat(body)
    return await _answer(request, body, job, None, admission.choices_per_prompt(body))


async def chat_input_tokens(request: web.Request) -> web.Response:
    """POST /chat/completions/input_tokens (llama.cpp's): ``{"input_tokens": n}``, the tokens the chat's
    prompt (as a chat completion would render it, tools included) takes, counted by the model's worker."""
    body = await read_json(request)
    job = openai.parse_chat(body)
    assert isinstance(job.params, TextParams)
    template = Job(op="apply_template", model=job.model,
                   params=TemplateParams(messages=job.params.messages,
                                         continue_final_message=job.params.continue_final_message))
    rendered = await result_of(request, await admission.admit(request, template))
    assert isinstance(rendered, TemplateResult)
    count = Job(op="tokenize", model=template.model, params=TokenizeParams(content=rendered.prompt, add_special=True))
    tokens = await result_of(request, await admission.admit(request, count))
    assert isinstance(tokens, TokenizeResult)
    return web.json_response({"input_tokens": len(tokens.tokens)})


async def _answer(request: web.Request, body: dict, job: Job, prompts: list[str] | None, n: int,
                  both: bool = False) -> web.StreamResponse:
    """Admit ``job`` and answer it: alone (``both``: with llama.cpp's keys too), or as one job per choice
    (``n`` per prompt) side by side."""
    admitted = await admission.admit(request, job)
    usage = openai.include_usage(body)
    if n == 1 and (prompts is None or len(prompts) == 1):
        renderer: Renderer = openai.OpenAIText(admitted.job, usage_chunk=usage)
        if both:
            n_ctx = int(admitted.meta.get("n_ctx") or 0)
            renderer = BothShapes(openai.OpenAIText(admitted.job, usage_chunk=usage),
                                  llamacpp.LlamaCppText(admitted.job, n_ctx=n_ctx))
        return await respond(request, admitted, renderer)
    assert isinstance(job.params, TextParams)
    params, prompt_of = admission.choice_params(job.params, prompts, n)
    jobs = admission.siblings(admitted, list(params))
    return await respond_choices(request, jobs, openai.OpenAIChoices([a.job for a in jobs], prompt_of,
                                                                     usage_chunk=usage))


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
