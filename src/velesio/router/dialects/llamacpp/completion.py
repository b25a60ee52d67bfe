"""llama.cpp's /completion: parsing a body into a typed job and rendering results in llama.cpp's shapes
(the llama.cpp server, LLM for Unity v2 and v3). No HTTP here; dialects/llamacpp/routes.py has the handlers.

POST /completion is shared with the seed's shape (dialects/seed): a body that uses any field only
llama.cpp knows (``n_predict``, ``id_slot``, ``cache_prompt``, ``grammar`` ... see ``LLAMACPP_FIELDS``) or a
token-array prompt is answered here, in llama.cpp's shapes:

- defaults are llama.cpp's: temperature 0.8, top_k 40, top_p 0.95, min_p 0.05, repeat_penalty 1.1,
  n_predict -1 (until end of text or context; 0 = evaluate the prompt only), seed -1 (random; 0 is a
  fixed seed like any other);
- a prompt is a string, a token array or a mixed array (``[12, "text", 34]``); token runs are turned into
  text with a ``detokenize`` job first. A list of prompts (``["a", [12, 34], ...]``, at most
  ``MAX_PROMPTS``) runs one job each, ``n_cmpl`` (alias ``n``) jobs each when asked (prompts × n_cmpl at
  most 16), side by side: the answer is an array of results (a stream interleaves their events), each with
  its ``index`` (prompt by prompt, its completions in turn), as llama.cpp answers;
- ``cache_prompt`` (default true) as llama.cpp: false evaluates the whole prompt afresh (a fixed seed then
  reproduces exactly; a prefix from the cache can change the logits' last bits);
- ``n_keep`` (-1: the whole prompt) is what a context shift keeps, on a model with
  ``options.context_shift``;
- fields that change nothing here are accepted and ignored: ``id_slot``,
  ``tfs_z``, ``penalize_nl``, ``penalty_prompt``, ``messages``, ``dry_*``, ``xtc_*``, ``dynatemp_*``,
  ``samplers``, ``n_indent``, ``lora`` ...; ``logit_bias`` (list or object form, ``false`` bans) is
  honoured; each stream event carries its piece's token ids in ``tokens``, and ``return_tokens`` puts
  the reply's in the whole reply's ``tokens`` (empty otherwise), as llama.cpp does;
  ``n_probs`` > 0 (at most ``MAX_PROBS``) adds ``completion_probabilities`` (dialects/logprobs.py) to the
  reply and to each stream event, before the sampler chain unless ``post_sampling_probs``;
- a stream is one ``data: {...}\\n\\n`` event per HTTP chunk, no comments and no ``[DONE]``; the last event
  has ``content: ""`` and ``stop: true``; an error mid-stream is one ``data: {"error": {...}}`` event;
- errors have llama.cpp's shape ``{"error": {"code": <int HTTP status>, "message", "type"}}``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from velesio.mesh.jobs import Job
from velesio.mesh.params import MAX_PROBS, MAX_TOKENS, TextParams, TextResult

from ...admission import MAX_CHOICES
from ...errors import ApiError, invalid
from ...validation import (
    check_grammar,
    check_json_schema,
    get_bool,
    get_float,
    get_int,
    get_logit_bias,
    get_model,
    get_stop,
    get_str,
)
from .. import logprobs

# Fields that only llama.cpp's /completion knows; any of them selects this dialect.
LLAMACPP_FIELDS = frozenset({
    "n_predict", "id_slot", "slot_id", "cache_prompt", "n_keep", "typical_p", "repeat_penalty", "repeat_last_n",
    "mirostat", "mirostat_tau", "mirostat_eta", "ignore_eos", "json_schema", "grammar", "tfs_z", "penalize_nl",
    "penalty_prompt", "n_probs", "min_p", "samplers", "return_tokens", "n_indent", "n_cache_reuse", "min_keep",
    "t_max_predict_ms", "timings_per_token", "return_progress", "post_sampling_probs", "response_fields", "lora",
    "top_n_sigma", "n_cmpl",
})
LLAMACPP_PREFIXES = ("dry_", "xtc_", "dynatemp_")

# llama.cpp's defaults (tools/server/README.md, "POST /completion") where they differ from the mesh's
# (velesio.mesh.params.TextParams): the one overlay of this dialect, applied when the job is built.
DEFAULTS: dict[str, Any] = {
    "max_tokens": -1,  # n_predict
    "temperature": 0.8,
    "top_p": 0.95,
    "min_p": 0.05,
    "repeat_penalty": 1.1,
}

RANDOM_SEED = 0xFFFFFFFF  # llama.cpp's LLAMA_DEFAULT_SEED: "pick one at random"


def wants(body: dict[str, Any]) -> bool:
    """True when a /completion body is llama.cpp's rather than the seed's."""
    for key in body:
        if key in LLAMACPP_FIELDS or key.startswith(LLAMACPP_PREFIXES):
            return True
    prompt = body.get("prompt")
    if isinstance(prompt, dict):
        return True  # {"prompt_string": ...}
    # token ids, or prompts given as token arrays or objects: only llama.cpp reads those
    return isinstance(prompt, list) and any(isinstance(p, (int, list, dict)) and not isinstance(p, bool)
                                            for p in prompt)


# ---- requests --------------------------------------------------------------------------------
MAX_TOKEN_ID = 2**31 - 1  # llama.cpp's token ids are int32


MAX_PROMPTS = MAX_CHOICES  # the most prompts one /completion request may list (each at least one choice)


Parts = list[str | list[int]]  # one prompt: text pieces and token-id runs, in order


def prompt_list(body: dict[str, Any]) -> list[Parts]:
    """Every prompt of the body, as llama.cpp reads ``prompt``: a string, a token array or a mixed array
    (``[12, "text", 34]``: an array with a number in it) is one prompt; any other array lists prompts, each
    of those forms. 400 for an empty prompt, or more than MAX_PROMPTS."""
    prompt = body.get("prompt")
    if prompt is None:
        raise invalid("prompt", "is required")
    if isinstance(prompt, list) and not _is_one_prompt(prompt):
        if not prompt:
            raise invalid("prompt", "must not be empty")
        if len(prompt) > MAX_PROMPTS:
            raise invalid("prompt", f"at most {MAX_PROMPTS} prompts in one request")
        return [_checked(_parts(p, f"prompt[{i}]"), f"prompt[{i}]") for i, p in enumerate(prompt)]
    return [_checked(_parts(prompt, "prompt"), "prompt")]


def prompt_parts(body: dict[str, Any]) -> Parts:
    """The body's one prompt (400 when it lists several)."""
    prompts = prompt_list(body)
    if len(prompts) != 1:
        raise invalid("prompt", "must be one prompt here")
    return prompts[0]


def _is_one_prompt(prompt: list[Any]) -> bool:
    return any(isinstance(p, int) and not isinstance(p, bool) for p in prompt)


def _checked(parts: Parts, where: str) -> Parts:
    if not any(parts):
        raise invalid(where, "must not be empty")
    return parts


def _parts(prompt: Any, where: str) -> Parts:
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, dict):  # llama.cpp's {"prompt_string", "multimodal_data"}
        if prompt.get("multimodal_data"):
            raise invalid(f"{where}.multimodal_data", "multimodal prompts are not supported")
        text = prompt.get("prompt_string")
        if not isinstance(text, str):
            raise invalid(f"{where}.prompt_string", "is required and must be a string")
        return [text]
    if not isinstance(prompt, list):
        raise invalid(where, "must be a string, an array of token ids or a mixed array")
    parts: Parts = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            parts.append(p)
        elif isinstance(p, int) and not isinstance(p, bool):
            if not 0 <= p <= MAX_TOKEN_ID:
                raise invalid(f"{where}[{i}]", f"token ids must be between 0 and {MAX_TOKEN_ID}")
            if parts and isinstance(parts[-1], list):
                parts[-1].append(p)
            else:
                parts.append([p])
        else:
            raise invalid(f"{where}[{i}]", "must be a token id or a string")
    return parts


def _seed(body: dict[str, Any]) -> int | None:
    seed = get_int(body, "seed", -1, lo=-(2**63), hi=2**64 - 1)
    if seed < 0 or seed == RANDOM_SEED:
        return None  # random, like llama.cpp's -1
    return seed % 2**32


# Sampling fields: name -> how a body's value (never null) is read (a 400 naming the field when it is out
# of range, llama.cpp's ranges).
SAMPLING: dict[str, Callable[[dict[str, Any]], Any]] = {
    "temperature": lambda b: max(0.0, get_float(b, "temperature", hi=100.0)),
    "top_k": lambda b: max(0, get_int(b, "top_k")),
    "top_p": lambda b: get_float(b, "top_p", lo=0.0, hi=1.0),
    "min_p": lambda b: get_float(b, "min_p", lo=0.0, hi=1.0),
    "typical_p": lambda b: get_float(b, "typical_p", lo=0.0, hi=1.0),
    "repeat_penalty": lambda b: get_float(b, "repeat_penalty", lo=0.0, hi=10.0),
    "repeat_last_n": lambda b: get_int(b, "repeat_last_n", lo=-1),
    "presence_penalty": lambda b: get_float(b, "presence_penalty", lo=-2.0, hi=2.0),
    "frequency_penalty": lambda b: get_float(b, "frequency_penalty", lo=-2.0, hi=2.0),
    "mirostat": lambda b: get_int(b, "mirostat", lo=0, hi=2),
    "mirostat_tau": lambda b: get_float(b, "mirostat_tau", lo=0.0),
    "mirostat_eta": lambda b: get_float(b, "mirostat_eta", lo=0.0),
}


def default_params() -> TextParams:
    """What a llama.cpp body that names no field gets."""
    return TextParams(**DEFAULTS)


def parse(body: dict[str, Any], prompt: str | None = None) -> Job:
    """A llama.cpp /completion body as a Job. ``prompt`` replaces ``body["prompt"]`` (used once token ids
    were turned into text); without it the prompt must be text."""
    if prompt is None:
        parts = prompt_parts(body)  # one prompt of text only: the callers of parse(body) alone
        if not all(isinstance(p, str) for p in parts):
            raise invalid("prompt", "token ids must be detokenized first (POST /completion does that)")
        prompt = "".join(parts)  # type: ignore[arg-type]
    n_predict = get_int(body, "n_predict", None, lo=-1, hi=MAX_TOKENS)
    if n_predict is None:  # llama.cpp also reads max_tokens
        n_predict = get_int(body, "max_tokens", DEFAULTS["max_tokens"], lo=-1, hi=MAX_TOKENS)
    n_probs = max(0, get_int(body, "n_probs", 0, hi=MAX_PROBS))  # llama.cpp reads a negative count as none
    grammar = get_str(body, "grammar", None) or None
    if grammar:
        check_grammar(grammar)
    schema = body.get("json_schema")
    if schema is not None and not isinstance(schema, (dict, bool)):
        raise invalid("json_schema", "must be a JSON schema object")
    check_json_schema(schema)
    if schema is True or schema == {}:
        schema = None  # any JSON value: no constraint
    if grammar and schema not in (None, False):
        raise invalid("grammar", 'either "json_schema" or "grammar" can be given, not both')
    fields: dict[str, Any] = {**DEFAULTS, "prompt": prompt, "max_tokens": n_predict, "stop": get_stop(body),
                              "seed": _seed(body), "ignore_eos": get_bool(body, "ignore_eos"), "grammar": grammar,
                              "json_schema": schema if isinstance(schema, dict) else None,
                              "logit_bias": get_logit_bias(body), "logprobs": n_probs or None,
                              "post_sampling_probs": get_bool(body, "post_sampling_probs"),
                              "cache_prompt": get_bool(body, "cache_prompt", True),
                              # llama.cpp's int32: any negative keeps the whole prompt (-1)
                              "n_keep": max(-1, get_int(body, "n_keep", 0, lo=-(2**31), hi=2**31 - 1))}
    for name, value in body.items():  # a request names a few of the sampling fields; the others keep defaults
        read = SAMPLING.get(name)
        if read is not None and value is not None:
            fields[name] = read(body)
    params = TextParams(**fields)
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
def _logit_bias(params: TextParams, eog: list[int]) -> list[dict[str, Any]]:
    """llama.cpp's ``logit_bias`` in ``generation_settings``: ``{"bias", "token"}`` for each token id the
    request biased (null bans), and each end-of-generation token banned when ``ignore_eos`` (the model's
    ``eog`` ids, as its worker advertises them). Biases given by string are applied by the worker, which
    knows the tokens, and are not listed."""
    out = []
    for key, bias in params.logit_bias:
        if isinstance(key, int):
            out.append({"bias": None if bias is None or bias == float("-inf") else bias, "token": key})
    if params.ignore_eos:
        out += [{"bias": None, "token": t} for t in eog]
    return out


def generation_settings(params: TextParams, n_ctx: int, model: str, *, seed: int | None = None,
                        stream: bool = False, eog: list[int] | None = None) -> dict[str, Any]:
    """llama.cpp's ``generation_settings``: n_ctx plus the sampling parameters in effect."""
    return {
        "n_ctx": n_ctx,
        "n_predict": params.max_tokens,
        "model": model,
        "seed": RANDOM_SEED if seed is None else seed,
        "temperature": params.temperature,
        "dynatemp_range": 0.0,
        "dynatemp_exponent": 1.0,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": params.min_p,
        "top_n_sigma": -1.0,
        "xtc_probability": 0.0,
        "xtc_threshold": 0.1,
        "typical_p": params.typical_p,
        "repeat_last_n": params.repeat_last_n,
        "repeat_penalty": params.repeat_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "mirostat": params.mirostat,
        "mirostat_tau": params.mirostat_tau,
        "mirostat_eta": params.mirostat_eta,
        # samplers llama.cpp has and the mesh does not apply, with the values that turn them off
        "dry_multiplier": 0.0,
        "dry_base": 1.75,
        "dry_allowed_length": 2,
        "dry_penalty_last_n": 64,
        "adaptive_target": -1.0,
        "adaptive_decay": 0.9,
        "stop": list(params.stop),
        "max_tokens": params.max_tokens,
        "n_keep": params.n_keep,
        "n_discard": 0,
        "min_keep": 0,
        "ignore_eos": params.ignore_eos,
        "stream": stream,
        "logit_bias": _logit_bias(params, eog or []),
        "n_probs": params.logprobs or 0,
        "post_sampling_probs": params.post_sampling_probs,
        "grammar": params.grammar or "",
        "json_schema": params.json_schema,
    }


def default_settings(n_ctx: int, model: str) -> dict[str, Any]:
    """/props ``default_generation_settings``."""
    params = generation_settings(default_params(), n_ctx, model)
    params.pop("n_ctx")
    params.pop("model")
    return {"n_ctx": n_ctx, "params": params, "model": model}


def _per(n: int, ms: float) -> tuple[float, float]:
    """(ms per token, tokens per second); llama.cpp reports 1e3/ms-style values, 0 when nothing ran."""
    per_token = ms / n if n else 0.0
    per_second = 1e3 * n / ms if n and ms > 0 else 0.0
    return round(per_token, 3), round(per_second, 3)


def timings(result: TextResult) -> dict[str, Any]:
    """llama.cpp's ``timings``: ``prompt_n`` the prompt tokens evaluated, ``cache_n`` those the prefix cache
    supplied instead."""
    cache_n = min(result.tokens_cached, result.prompt_tokens)
    prompt_n, predicted_n = result.prompt_tokens - cache_n, result.completion_tokens
    prompt_ms, predicted_ms = result.prompt_ms, result.predicted_ms
    p_tok, p_sec = _per(prompt_n, prompt_ms)
    g_tok, g_sec = _per(predicted_n, predicted_ms)
    return {"cache_n": cache_n, "prompt_n": prompt_n, "prompt_ms": prompt_ms, "prompt_per_token_ms": p_tok,
            "prompt_per_second": p_sec, "predicted_n": predicted_n, "predicted_ms": predicted_ms,
            "predicted_per_token_ms": g_tok, "predicted_per_second": g_sec}


class LlamaCppText:
    """Renders one completion job in llama.cpp's shapes, whole or as a stream."""

    done_marker = False

    def __init__(self, job: Job, *, n_ctx: int = 0, fields: list[str] | None = None, return_tokens: bool = False,
                 index: int = 0, eog: list[int] | None = None):
        assert isinstance(job.params, TextParams)
        self.job = job
        self.index = index  # the prompt's index in the request's list of prompts
        self.eog = eog or []  # the model's end-of-generation token ids (generation_settings.logit_bias)
        self.return_tokens = return_tokens
        self.params = job.params
        self.n_ctx = n_ctx
        self.fields = fields
        self.pieces = 0

    def _final(self, result: TextResult, content: str) -> dict[str, Any]:
        prompt_n, predicted_n = result.prompt_tokens, result.completion_tokens
        stop_type = result.stop_type or ("limit" if result.finish_reason == "length" else "eos")
        text = result.text
        out = {
            "index": self.index,
            "content": content,
            "tokens": list(result.tokens) if self.return_tokens and content else [],
            "id_slot": -1,
            "stop": True,
            "model": self.job.model,
            "tokens_predicted": predicted_n,
            "tokens_evaluated": prompt_n,
            "generation_settings": generation_settings(self.params, self.n_ctx, self.job.model, seed=result.seed,
                                                       stream=self.job.stream, eog=self.eog),
            "prompt": self.params.prompt,
            "has_new_line": "\n" in text,
            # llama.cpp's: the prompt and the reply filled the sequence's context (generation stopped there, or
            # went on after a context shift)
            "truncated": result.truncated or (bool(self.n_ctx) and stop_type == "limit"
                                              and prompt_n + predicted_n >= self.n_ctx),
            "stop_type": stop_type,
            "stopping_word": result.stopping_word,
            "tokens_cached": prompt_n + predicted_n,
            "timings": timings(result),
            # older llama.cpp builds (LLM for Unity v2's ChatResult declares them)
            "stopped_eos": stop_type == "eos",
            "stopped_word": stop_type == "word",
            "stopped_limit": stop_type == "limit",
        }
        if self.params.logprobs and not self.job.stream:
            out["completion_probabilities"] = logprobs.llamacpp(result.probs, self.params.post_sampling_probs)
        return _pick(out, self.fields) if self.fields else out

    def render(self, result: TextResult) -> dict[str, Any]:
        return self._final(result, result.text)

    def start(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        text = chunk.get("text")
        if not text:
            return []
        tokens = [t for t in chunk.get("tokens") or () if isinstance(t, int)]
        self.pieces += max(1, len(tokens))
        # tokens_evaluated is only known at the end; partials report 0 (the final event has the count)
        event = {"index": self.index, "content": text, "tokens": tokens, "stop": False,
                 "id_slot": -1, "tokens_predicted": self.pieces, "tokens_evaluated": 0}
        if self.params.logprobs:
            event["completion_probabilities"] = logprobs.llamacpp(chunk.get("probs"),
                                                                  self.params.post_sampling_probs)
        return [event]

    def end(self, result: TextResult) -> list[dict[str, Any]]:
        return [self._final(result, "")]

    def error(self, err: ApiError) -> list[dict[str, Any]]:
        return [error_body(err)]


class LlamaCppChoices:
    """The results of a request that listed several prompts: an array of llama.cpp results, or one stream
    of their events, each with its prompt's ``index``."""

    done_marker = False

    def __init__(self, renderers: list[LlamaCppText]):
        self.each = renderers

    def render(self, results: list[TextResult]) -> list[dict[str, Any]]:
        return [r.render(result) for r, result in zip(self.each, results, strict=True)]

    def start(self) -> list[dict[str, Any]]:
        return []

    def chunk(self, i: int, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        return self.each[i].chunk(chunk)

    def end(self, i: int, result: TextResult) -> list[dict[str, Any]]:
        return self.each[i].end(result)

    def finish(self, results: list[TextResult]) -> list[dict[str, Any]]:
        return []

    def error(self, err: ApiError) -> list[dict[str, Any]]:
        return [error_body(err)]


def error_body(err: ApiError) -> dict[str, Any]:
    """llama.cpp's error shape (``code`` is the HTTP status) with the seed's ``details``, and llama.cpp's
    ``n_prompt_tokens`` / ``n_ctx`` on a context error."""
    return {"error": {"code": err.status, "message": err.message, "type": err.type, "details": err.details,
                      **err.extra}}
