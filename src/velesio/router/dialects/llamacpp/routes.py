"""llama.cpp's (and LLM for Unity's) routes: /completion in llama.cpp's shape (chosen by the seed dialect's
/completion handler), and /tokenize, /detokenize, /template, /apply-template, /props, /slots, /embeddings
and /v1/embeddings.

Every route accepts POST (LLM for Unity v3 POSTs everything, with a ``stream`` key that is ignored);
/props and /slots also answer GET. The work runs on the mesh as ``tokenize``, ``detokenize``,
``apply_template`` and ``embeddings`` jobs; /template, /props and /slots are answered from what workers
advertise. Errors have llama.cpp's shape ``{"error": {"code": <int>, "message", "type"}}``.

/embeddings answers two shapes (docs/clients.md, "Embeddings"): ``{"embedding": [...]}`` for LLM for
Unity v2 (its UnityWebRequest always sends ``X-Unity-Version``; it parses an object with JsonUtility), and
``[{"index": 0, "embedding": [...]}]`` (current llama.cpp, LLM for Unity v3) for everyone else.
/v1/embeddings answers OpenAI's list."""

from __future__ import annotations

from typing import Any, TypeVar

from aiohttp import web

from velesio import __version__
from velesio.mesh.jobs import Job
from velesio.mesh.params import (
    DetokenizeParams,
    DetokenizeResult,
    EmbeddingsParams,
    EmbeddingsResult,
    Result,
    TemplateParams,
    TemplateResult,
    TextParams,
    TokenizeParams,
    TokenizeResult,
)

from ... import admission
from ...errors import ApiError, invalid
from ...keys import SCHEDULER
from ...relay import dumps, respond, respond_choices, result_of
from ...validation import get_bool, get_continuation, get_messages, get_model, get_str, read_json
from ..base import CHOSEN
from . import completion as llamacpp
from . import embeddings as embeddings_io

# LLM for Unity's chat template names (Runtime/LLMChatTemplates.cs); /template must answer one of them.
LLMUNITY_TEMPLATES = ("chatml", "alpaca", "gemma", "mistral chat", "mistral instruct", "llama3 chat", "llama chat",
                      "llama", "phi-4-mini", "phi-4", "phi-3.5", "phi-3", "phi", "deepseek-r1", "deepseek-v3",
                      "deepseek-v2", "vicuna", "zephyr", "qwen3", "bitnet")


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.json_response(obj, status=status, dumps=dumps)


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON body of a POST (empty allowed), or the query string of a GET."""
    if request.method == "GET":
        return dict(request.query)
    return await read_json(request, allow_empty=True)


async def _model(request: web.Request, op: str, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The model a request names (or an alias of it, or the default for ``op``) and the info its workers
    advertise."""
    name = await admission.resolve_model(request, op, get_model(body))
    return name, request.app[SCHEDULER].model_info(name) or {}


R = TypeVar("R", bound=Result)


async def _run(request: web.Request, job: Job, result_type: type[R]) -> R:
    """Admit and run a utility job; its result, of the op's type."""
    result = await result_of(request, await admission.admit(request, job))
    assert isinstance(result, result_type)
    return result


def _token_ids(body: dict[str, Any], name: str = "tokens") -> list[int]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise invalid(name, "must be an array of token ids")
    return value


# ---- tokens ----------------------------------------------------------------------------------
async def tokenize(request: web.Request) -> web.Response:
    body = await read_json(request, allow_empty=True)
    params = TokenizeParams(content=get_str(body, "content", ""), add_special=get_bool(body, "add_special"),
                            with_pieces=get_bool(body, "with_pieces"))
    result = await _run(request, Job(op="tokenize", model=get_model(body) or "", params=params), TokenizeResult)
    return _json({"tokens": result.tokens})


async def detokenize(request: web.Request) -> web.Response:
    body = await read_json(request, allow_empty=True)
    job = Job(op="detokenize", model=get_model(body) or "", params=DetokenizeParams(tokens=_token_ids(body)))
    result = await _run(request, job, DetokenizeResult)
    return _json({"content": result.content})


# ---- templates -------------------------------------------------------------------------------
async def template(request: web.Request) -> web.Response:
    """LLM for Unity v2: the name of the model's chat template in LLM for Unity's table."""
    body = await _body(request)
    _name, info = await _model(request, "chat", body)
    name = (info.get("meta") or {}).get("template")
    return _json({"template": name if name in LLMUNITY_TEMPLATES else "chatml"})


async def apply_template(request: web.Request) -> web.Response:
    body = await read_json(request, allow_empty=True)
    messages = get_messages(body)
    continue_final = get_continuation(body, messages)
    params = TemplateParams(messages=messages, continue_final_message=continue_final,
                            add_generation_prompt=get_bool(body, "add_generation_prompt", True) or continue_final)
    job = Job(op="apply_template", model=get_model(body) or "", params=params)
    result = await _run(request, job, TemplateResult)
    return _json({"prompt": result.prompt})


# ---- server properties -----------------------------------------------------------------------
async def props(request: web.Request) -> web.Response:
    """GET or POST /props. POST changes nothing (llama.cpp needs --props for that); it answers like GET."""
    body = await _body(request)
    name, info = await _model(request, "completion", body)
    meta = info.get("meta") or {}
    live = request.app[SCHEDULER].live_models().get(name, {})
    n_ctx = int(meta.get("n_ctx") or 0)
    return _json({
        "default_generation_settings": llamacpp.default_settings(n_ctx, name),
        "total_slots": int(live.get("slots_total") or info.get("slots") or 1),
        "model_path": meta.get("model_path") or name,
        "chat_template": meta.get("chat_template") or "",
        "modalities": {"vision": False, "audio": False},
        "build_info": f"velesio {__version__}",
    })


async def slots(request: web.Request) -> web.Response:
    """GET /slots: the slots of the default (or named) model across the mesh, busy ones first."""
    body = await _body(request)
    name, info = await _model(request, "completion", body)
    live = request.app[SCHEDULER].live_models().get(name, {})
    total, free = int(live.get("slots_total") or 0), int(live.get("slots_free") or 0)
    if request.query.get("fail_on_no_slot") not in (None, "", "0", "false") and free == 0:
        raise ApiError("busy", "no slot available", headers={"Retry-After": "1"})
    n_ctx = int((info.get("meta") or {}).get("n_ctx") or 0)
    params = llamacpp.default_settings(n_ctx, name)["params"]
    return _json([{"id": i, "n_ctx": n_ctx, "is_processing": i < total - free, "params": params,
                   "next_token": {"has_next_token": i < total - free, "n_remain": -1, "n_decoded": 0}}
                  for i in range(total)])


# ---- embeddings ------------------------------------------------------------------------------
def wants_v2_shape(request: web.Request) -> bool:
    """LLM for Unity v2 (UnityWebRequest) parses ``{"embedding": [...]}``; Unity always sets X-Unity-Version."""
    return "X-Unity-Version" in request.headers or "UnityPlayer" in request.headers.get("User-Agent", "")


async def _embedding_model(request: web.Request, body: dict[str, Any]) -> str:
    """The model that embeds for this request (its ``model``, an alias of it, or the default); 400 saying
    how to enable embeddings when the live models serve none."""
    name = get_model(body)
    live = request.app[SCHEDULER].live_models()
    if not name and live and not any("embeddings" in (m.get("operations") or ()) for m in live.values()):
        raise ApiError("invalid_request", "no model is loaded with embeddings; a llama-cpp model serves them "
                       "with options.embeddings: true in mesh.yaml (the embedded SmolLM2 does by default)",
                       {"operation": "embeddings"}, param="model")
    return await admission.resolve_model(request, "embeddings", name)


async def _embed(request: web.Request, model: str, parts: embeddings_io.Input) -> tuple[list[float], int]:
    """One input's pooled vector and token count. Text is tokenized by the backend; token ids (and the text
    pieces of a mixed input, tokenized here first) are embedded as they are."""
    if all(isinstance(p, str) for p in parts):
        params = EmbeddingsParams(content="".join(p for p in parts if isinstance(p, str)))
    else:
        tokens: list[int] = []
        for part in parts:
            if isinstance(part, str):
                job = Job(op="tokenize", model=model, params=TokenizeParams(content=part))
                tokens += [int(t) for t in (await _run(request, job, TokenizeResult)).tokens]
            else:
                tokens += part
        params = EmbeddingsParams(tokens=tokens)
    result = await _run(request, Job(op="embeddings", model=model, params=params), EmbeddingsResult)
    return list(result.embedding), result.prompt_tokens


async def _embed_all(request: web.Request, body: dict[str, Any], field: str,
                     value: Any) -> tuple[str, list[list[float]], int]:
    """(model, normalised vectors, prompt tokens) of a request's inputs, embedded one after the other."""
    inputs = embeddings_io.inputs(value, field)
    mode = embeddings_io.normalise_mode(body)
    model = await _embedding_model(request, body)
    vectors, tokens = [], 0
    for parts in inputs:
        vector, n = await _embed(request, model, parts)
        vectors.append(embeddings_io.normalise(vector, mode))
        tokens += n
    return model, vectors, tokens


async def embeddings(request: web.Request) -> web.Response:
    """POST /embeddings (llama.cpp): ``content`` (or ``input``): one input or a list of them."""
    body = await read_json(request)
    field = "input" if "input" in body and "content" not in body else "content"
    _model, vectors, _tokens = await _embed_all(request, body, field, body.get(field))
    if wants_v2_shape(request) and len(vectors) == 1:
        return _json({"embedding": vectors[0]})
    return _json([{"index": i, "embedding": v} for i, v in enumerate(vectors)])


async def v1_embeddings(request: web.Request) -> web.Response:
    """POST /v1/embeddings (OpenAI): ``input`` (or ``content``): one input or a list of them;
    ``encoding_format`` float or base64."""
    body = await read_json(request)
    fmt = embeddings_io.encoding_format(body)
    field = "input" if "input" in body else "content"
    model, vectors, tokens = await _embed_all(request, body, field, body.get(field))
    data = [{"object": "embedding", "index": i, "embedding": embeddings_io.encode(v, fmt)}
            for i, v in enumerate(vectors)]
    return _json({"object": "list", "data": data, "model": model,
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})


# ---- completion ------------------------------------------------------------------------------
async def detokenize_parts(request: web.Request, parts: list[str | list[int]], model: str) -> str:
    """Text for a prompt given as token ids or a mixed array (one detokenize job per run of ids)."""
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        else:
            job = Job(op="detokenize", model=model, params=DetokenizeParams(tokens=part))
            out.append((await _run(request, job, DetokenizeResult)).content)
    return "".join(out)


async def completion(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """POST /completion in llama.cpp's dialect: one prompt, or a list of them, each ``n_cmpl`` times; the
    jobs run side by side."""
    from . import DIALECT  # this package's __init__ builds it from these routes

    request[CHOSEN] = DIALECT
    prompts = llamacpp.prompt_list(body)
    job = llamacpp.parse(body, prompt="")  # validates every field before any job runs
    assert isinstance(job.params, TextParams)
    admitted = await admission.admit(request, job)
    texts = []
    for i, parts in enumerate(prompts):
        text = await detokenize_parts(request, parts, job.model)
        if not text:
            raise invalid("prompt" if len(prompts) == 1 else f"prompt[{i}]",
                          "must not be empty (the token ids are no text)")
        texts.append(text)
    # llama.cpp's n_cmpl (alias n): completions per prompt, indexed prompt by prompt
    n = admission.choices_per_prompt(body, len(texts), "n_cmpl" if "n_cmpl" in body else "n")
    jobs = admission.siblings(admitted, list(admission.choice_params(job.params, texts, n)[0]))
    n_ctx = int(admitted.meta.get("n_ctx") or 0)
    fields, return_tokens = llamacpp.response_fields(body), get_bool(body, "return_tokens")
    eog = [t for t in admitted.meta.get("eog") or () if isinstance(t, int)]
    renderers = [llamacpp.LlamaCppText(a.job, n_ctx=n_ctx, fields=fields, return_tokens=return_tokens, index=i,
                                       eog=eog) for i, a in enumerate(jobs)]
    if len(jobs) == 1:
        return await respond(request, jobs[0], renderers[0])
    return await respond_choices(request, jobs, llamacpp.LlamaCppChoices(renderers))


async def infill(request: web.Request) -> web.Response:
    raise ApiError("not_supported", "infill is not supported by this server; use /completion")
