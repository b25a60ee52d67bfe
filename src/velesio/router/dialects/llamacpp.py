"""llama.cpp's /completion dialect (the llama.cpp server, LLM for Unity v2 and v3).

POST /completion is shared with the seed's shape (router/text_routes.py): a body that uses any field only
llama.cpp knows (``n_predict``, ``id_slot``, ``cache_prompt``, ``grammar`` ... see ``LLAMACPP_FIELDS``) or a
token-array prompt is answered here, in llama.cpp's shapes:

- defaults are llama.cpp's: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, repeat_penalty 1.1,
  n_predict -1 (until end of text or context; 0 = evaluate the prompt only), seed -1 (random; 0 is a
  fixed seed like any other);
- a prompt is a string, a token array or a mixed array (``[12, "text", 34]``); token runs are turned into
  text with a ``detokenize`` job first. A list of several prompts is refused with 400;
- fields that change nothing here are accepted and ignored: ``id_slot``, ``cache_prompt``, ``n_keep``,
  ``tfs_z``, ``penalize_nl``, ``penalty_prompt``, ``messages``, ``dry_*``, ``xtc_*``, ``dynatemp_*``,
  ``samplers``, ``logit_bias``, ``return_tokens``, ``n_indent``, ``lora`` ...; ``n_probs`` > 0 is refused
  with 400 (no token probabilities);
- a stream is one ``data: {...}\\n\\n`` event per HTTP chunk, no comments and no ``[DONE]``; the last event
  has ``content: ""`` and ``stop: true``; an error mid-stream is one ``data: {"error": {...}}`` event;
- errors have llama.cpp's shape ``{"error": {"code": <int HTTP status>, "message", "type"}}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from velesio.mesh.jobs import Job

from ..errors import ApiError, invalid
from ..keys import ERROR_STYLE, SCHEDULER
from ..relay import respond, result_of
from ..validation import get_bool, get_float, get_int, get_model, get_stop, get_str

MAX_TOKENS_CAP = 32768

# Fields that only llama.cpp's /completion knows; any of them selects this dialect.
LLAMACPP_FIELDS = frozenset({
    "n_predict", "id_slot", "slot_id", "cache_prompt", "n_keep", "typical_p", "repeat_penalty", "repeat_last_n",
    "mirostat", "mirostat_tau", "mirostat_eta", "ignore_eos", "json_schema", "grammar", "tfs_z", "penalize_nl",
    "penalty_prompt", "n_probs", "min_p", "samplers", "return_tokens", "n_indent", "n_cache_reuse", "min_keep",
    "t_max_predict_ms", "timings_per_token", "return_progress", "post_sampling_probs", "response_fields", "lora",
    "top_n_sigma",
})
LLAMACPP_PREFIXES = ("dry_", "xtc_", "dynatemp_")

# llama.cpp's defaults (tools/server/README.md, "POST /completion").
DEFAULTS: dict[str, Any] = {
    "n_predict": -1,
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "typical_p": 1.0,
    "repeat_penalty": 1.1,
    "repeat_last_n": 64,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "mirostat": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.1,
    "seed": -1,
    "ignore_eos": False,
}

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: "pick one at random"


def wants(body: dict[str, Any]) -> bool:
    """True when a /completion body is llama.cpp's rather than the seed's."""
    for key in body:
        if key in LLAMACPP_FIELDS or key.startswith(LLAMACPP_PREFIXES):
            return True
    prompt = body.get("prompt")
    return isinstance(prompt, list) and any(isinstance(p, int) and not isinstance(p, bool) for p in prompt)


# ---- requests --------------------------------------------------------------------------------
def prompt_parts(body: dict[str, Any]) -> list[str | list[int]]:
    """The prompt as text pieces and token-id runs, in order (a string gives one piece)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("prompt", "is required")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, dict):
        raise invalid("prompt", "multimodal prompts are not supported")
    if not isinstance(prompt, list):
        raise invalid("prompt", "must be a string, an array of token ids or a mixed array")
    if len(prompt) == 1 and isinstance(prompt[0], (str, list, dict)):
        return prompt_parts({"prompt": prompt[0]})
    has_int = any(isinstance(p, int) and not isinstance(p, bool) for p in prompt)
    if not has_int and len(prompt) > 1:
        raise invalid("prompt", "several prompts in one request are not supported; send one request per prompt")
    parts: list[str | list[int]] = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            parts.append(p)
        elif isinstance(p, int) and not isinstance(p, bool):
            if p < 0:
                raise invalid(f"prompt[{i}]", "token ids must not be negative")
            if parts and isinstance(parts[-1], list):
                parts[-1].append(p)
            else:
                parts.append([p])
        else:
            raise invalid(f"prompt[{i}]", "must be a token id or a string")
    return parts


def _seed(body: dict[str, Any]) -> int | None:
    seed = get_int(body, "seed", DEFAULTS["seed"], lo=-(2**63), hi=2**64 - 1)
    if seed < 0 or seed == RANDOM_SEED:
        return None  # random, like llama.cpp's -1
    return seed % 2**32


# Sampling fields: name -> how it is read from a body (a 400 naming the field when it is out of range).
SAMPLING: dict[str, Callable[[dict[str, Any]], Any]] = {
    "temperature": lambda b: max(0.0, get_float(b, "temperature", DEFAULTS["temperature"], hi=100.0)),
    "top_k": lambda b: max(0, get_int(b, "top_k", DEFAULTS["top_k"])),
    "top_p": lambda b: get_float(b, "top_p", DEFAULTS["top_p"], lo=0.0, hi=1.0),
    "min_p": lambda b: get_float(b, "min_p", DEFAULTS["min_p"], lo=0.0, hi=1.0),
    "typical_p": lambda b: get_float(b, "typical_p", DEFAULTS["typical_p"], lo=0.0, hi=1.0),
    "repeat_penalty": lambda b: get_float(b, "repeat_penalty", DEFAULTS["repeat_penalty"], lo=0.0, hi=10.0),
    "repeat_last_n": lambda b: get_int(b, "repeat_last_n", DEFAULTS["repeat_last_n"], lo=-1),
    "presence_penalty": lambda b: get_float(b, "presence_penalty", 0.0, lo=-2.0, hi=2.0),
    "frequency_penalty": lambda b: get_float(b, "frequency_penalty", 0.0, lo=-2.0, hi=2.0),
    "mirostat": lambda b: get_int(b, "mirostat", 0, lo=0, hi=2),
    "mirostat_tau": lambda b: get_float(b, "mirostat_tau", DEFAULTS["mirostat_tau"], lo=0.0),
    "mirostat_eta": lambda b: get_float(b, "mirostat_eta", DEFAULTS["mirostat_eta"], lo=0.0),
}
SAMPLING_DEFAULTS = {name: read({}) for name, read in SAMPLING.items()}  # what a body without them gets


def parse(body: dict[str, Any], prompt: str | None = None) -> Job:
    """A llama.cpp /completion body as a Job. ``prompt`` replaces ``body["prompt"]`` (used once token ids
    were turned into text); without it the prompt must be text."""
    if prompt is None:
        parts = prompt_parts(body)
        if not all(isinstance(p, str) for p in parts):
            raise invalid("prompt", "token ids must be detokenized first (POST /completion does that)")
        prompt = "".join(parts)  # type: ignore[arg-type]
    n_predict = get_int(body, "n_predict", None, lo=-1, hi=MAX_TOKENS_CAP)
    if n_predict is None:  # llama.cpp also reads max_tokens
        n_predict = get_int(body, "max_tokens", DEFAULTS["n_predict"], lo=-1, hi=MAX_TOKENS_CAP)
    if get_int(body, "n_probs", 0) > 0:
        raise invalid("n_probs", "token probabilities are not supported")
    grammar = get_str(body, "grammar", None) or None
    schema = body.get("json_schema")
    if schema is not None and not isinstance(schema, (dict, bool)):
        raise invalid("json_schema", "must be a JSON schema object")
    if schema is True or schema == {}:
        schema = None  # any JSON value: no constraint
    if grammar and schema not in (None, False):
        raise invalid("grammar", 'either "json_schema" or "grammar" can be given, not both')
    params = {"prompt": prompt, "max_tokens": n_predict, **SAMPLING_DEFAULTS, "stop": get_stop(body),
              "seed": _seed(body), "ignore_eos": get_bool(body, "ignore_eos"), "grammar": grammar,
              "json_schema": schema if isinstance(schema, dict) else None}
    for name in body:  # a request names a few of the sampling fields; the others keep their defaults
        read = SAMPLING.get(name)
        if read is not None:
            params[name] = read(body)
    return Job(op="completion", model=get_model(body) or "", params=params, stream=get_bool(body, "stream"))


def response_fields(body: dict[str, Any]) -> list[str] | None:
    fields = body.get("response_fields")
    if fields is None:
        return None
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise invalid("response_fields", "must be an array of strings")
    return fields


def _pick(obj: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """llama.cpp's response_fields: keep the named keys; ``a/b`` names a nested key (kept flat)."""
    out: dict[str, Any] = {}
    for path in fields:
        value: Any = obj
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[path] = value
    return out


# ---- responses -------------------------------------------------------------------------------
def generation_settings(params: dict[str, Any], n_ctx: int, model: str, *, seed: int | None = None,
                        stream: bool = False) -> dict[str, Any]:
    """llama.cpp's ``generation_settings``: n_ctx plus the sampling parameters in effect."""
    return {
        "n_ctx": n_ctx,
        "n_predict": params.get("max_tokens", DEFAULTS["n_predict"]),
        "model": model,
        "seed": RANDOM_SEED if seed is None else seed,
        "temperature": params.get("temperature", DEFAULTS["temperature"]),
        "dynatemp_range": 0.0,
        "dynatemp_exponent": 1.0,
        "top_k": params.get("top_k", DEFAULTS["top_k"]),
        "top_p": params.get("top_p", DEFAULTS["top_p"]),
        "min_p": params.get("min_p", DEFAULTS["min_p"]),
        "xtc_probability": 0.0,
        "xtc_threshold": 0.1,
        "typical_p": params.get("typical_p", DEFAULTS["typical_p"]),
        "repeat_last_n": params.get("repeat_last_n", DEFAULTS["repeat_last_n"]),
        "repeat_penalty": params.get("repeat_penalty", DEFAULTS["repeat_penalty"]),
        "presence_penalty": params.get("presence_penalty", 0.0),
        "frequency_penalty": params.get("frequency_penalty", 0.0),
        "mirostat": params.get("mirostat", 0),
        "mirostat_tau": params.get("mirostat_tau", DEFAULTS["mirostat_tau"]),
        "mirostat_eta": params.get("mirostat_eta", DEFAULTS["mirostat_eta"]),
        "stop": list(params.get("stop") or []),
        "max_tokens": params.get("max_tokens", DEFAULTS["n_predict"]),
        "n_keep": 0,
        "ignore_eos": params.get("ignore_eos", False),
        "stream": stream,
        "n_probs": 0,
        "grammar": params.get("grammar") or "",
        "json_schema": params.get("json_schema"),
    }


def default_settings(n_ctx: int, model: str) -> dict[str, Any]:
    """/props ``default_generation_settings``."""
    params = generation_settings({"max_tokens": DEFAULTS["n_predict"]}, n_ctx, model)
    params.pop("n_ctx")
    params.pop("model")
    return {"n_ctx": n_ctx, "params": params, "model": model}


def _per(n: int, ms: float) -> tuple[float, float]:
    """(ms per token, tokens per second); llama.cpp reports 1e3/ms-style values, 0 when nothing ran."""
    per_token = ms / n if n else 0.0
    per_second = 1e3 * n / ms if n and ms > 0 else 0.0
    return round(per_token, 3), round(per_second, 3)


def timings(result: dict[str, Any]) -> dict[str, Any]:
    t = result.get("timings") or {}
    prompt_n = int(t.get("prompt_n", result.get("prompt_tokens") or 0))
    predicted_n = int(t.get("predicted_n", result.get("completion_tokens") or 0))
    prompt_ms = float(t.get("prompt_ms") or 0.0)
    predicted_ms = float(t.get("predicted_ms") or 0.0)
    p_tok, p_sec = _per(prompt_n, prompt_ms)
    g_tok, g_sec = _per(predicted_n, predicted_ms)
    return {"cache_n": 0, "prompt_n": prompt_n, "prompt_ms": prompt_ms, "prompt_per_token_ms": p_tok,
            "prompt_per_second": p_sec, "predicted_n": predicted_n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": g_tok, "predicted_per_second": g_sec}


class LlamaCppText:
    """Renders one completion job in llama.cpp's shapes, whole or as a stream."""

    error_style = "llamacpp"
    done_marker = False

    def __init__(self, job: Job, *, n_ctx_of=None, fields: list[str] | None = None):
        self.job = job
        self.n_ctx_of = n_ctx_of or (lambda model: 0)
        self.fields = fields
        self.pieces = 0

    def _final(self, result: dict[str, Any], content: str) -> dict[str, Any]:
        prompt_n = int(result.get("prompt_tokens") or 0)
        predicted_n = int(result.get("completion_tokens") or 0)
        stop_type = result.get("stop_type") or ("limit" if result.get("finish_reason") == "length" else "eos")
        text = result.get("text") or ""
        out = {
            "index": 0,
            "content": content,
            "tokens": [],
            "id_slot": -1,
            "stop": True,
            "model": self.job.model,
            "tokens_predicted": predicted_n,
            "tokens_evaluated": prompt_n,
            "generation_settings": generation_settings(self.job.params, self.n_ctx_of(self.job.model),
                                                       self.job.model, seed=result.get("seed"),
                                                       stream=self.job.stream),
            "prompt": self.job.params.get("prompt", ""),
            "has_new_line": "\n" in text,
            "truncated": False,
            "stop_type": stop_type,
            "stopping_word": result.get("stopping_word") or "",
            "tokens_cached": prompt_n + predicted_n,
            "timings": timings(result),
            # older llama.cpp builds (LLM for Unity v2's ChatResult declares them)
            "stopped_eos": stop_type == "eos",
            "stopped_word": stop_type == "word",
            "stopped_limit": stop_type == "limit",
        }
        return _pick(out, self.fields) if self.fields else out

    def render(self, result: dict[str, Any]) -> dict[str, Any]:
        return self._final(result, result.get("text") or "")

    def start(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        text = chunk.get("text")
        if not text:
            return []
        self.pieces += max(1, len(chunk.get("tokens") or ()))
        # tokens_evaluated is only known at the end; partials report 0 (the final event has the count)
        return [{"index": 0, "content": text, "tokens": [], "stop": False, "id_slot": -1,
                 "tokens_predicted": self.pieces, "tokens_evaluated": 0}]

    def end(self, result: dict[str, Any]) -> list[dict[str, Any]]:
        return [self._final(result, "")]

    def error(self, err: ApiError) -> list[dict[str, Any]]:
        return [error_body(err)]


def error_body(err: ApiError) -> dict[str, Any]:
    return {"error": {"code": err.status, "message": err.message, "type": err.type}}


def n_ctx_lookup(request: web.Request):
    scheduler = request.app[SCHEDULER]

    def n_ctx_of(model: str) -> int:
        info = scheduler.model_info(model) or {}
        return int((info.get("meta") or {}).get("n_ctx") or 0)

    return n_ctx_of


async def detokenize_parts(request: web.Request, parts: list[str | list[int]], model: str | None) -> str:
    """Text for a prompt given as token ids or a mixed array (one detokenize job per run of ids)."""
    out = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
        else:
            job = Job(op="detokenize", model=model or "", params={"tokens": part})
            out.append(str((await result_of(request, job)).get("content", "")))
    return "".join(out)


async def completion(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """POST /completion in llama.cpp's dialect."""
    request[ERROR_STYLE] = "llamacpp"
    parts = prompt_parts(body)
    job = parse(body, prompt="")  # validates every field before any job runs
    if any(not isinstance(p, str) for p in parts):
        job.model = await request.app[SCHEDULER].resolve_model("completion", job.model or None)
        job.params["prompt"] = await detokenize_parts(request, parts, job.model)
    else:
        job.params["prompt"] = "".join(parts)  # type: ignore[arg-type]
    renderer = LlamaCppText(job, n_ctx_of=n_ctx_lookup(request), fields=response_fields(body))
    return await respond(request, job, renderer)
