"""The seed's and OpenAI's text shapes: /completion (seed), /chat/completions, /v1/completions,
/v1/chat/completions. The seed's shapes are a subset of OpenAI's, so one dialect serves both.

Request fields we cannot honour are handled per field (docs/clients.md): ``n`` > 1, ``echo``, ``best_of`` > 1
and ``logprobs`` are refused with 400; ``user``, ``tools``, ``tool_choice``, ``parallel_tool_calls``,
``suffix``, ``store``, ``metadata`` and other unknown fields are ignored;
``response_format`` json_object / json_schema, and llama.cpp's ``grammar`` and ``json_schema``, constrain the
output with a grammar."""

from __future__ import annotations

import time
import uuid
from typing import Any

from velesio.mesh.jobs import Job
from velesio.mesh.params import MAX_TOKENS, TextParams, TextResult

from ...errors import ApiError, invalid
from ...validation import (
    check_grammar,
    check_json_schema,
    get_bool,
    get_float,
    get_int,
    get_logit_bias,
    get_messages,
    get_model,
    get_stop,
    get_str,
)
from ..base import seed_error


def _given(**fields: Any) -> dict[str, Any]:
    """The fields a request named (None: not named, the mesh default applies)."""
    return {k: v for k, v in fields.items() if v is not None}


def _common_params(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields of a seed / OpenAI body, each checked against the API's range."""
    max_tokens = get_int(body, "max_completion_tokens", None, lo=1, hi=MAX_TOKENS)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", None, lo=1, hi=MAX_TOKENS)
    n = get_int(body, "n", 1, lo=1)
    if n != 1:
        raise invalid("n", "only n=1 is supported")
    if get_int(body, "best_of", 1, lo=1) != 1:
        raise invalid("best_of", "only best_of=1 is supported")
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs") not in (None, 0):
        raise invalid("logprobs", "log probabilities are not supported")
    seed = get_int(body, "seed", None, lo=-(2**63), hi=2**64 - 1)
    seed = seed % 2**31 if seed is not None and seed >= 0 else None
    params = _given(
        max_tokens=max_tokens,
        temperature=get_float(body, "temperature", None, lo=0.0, hi=2.0),
        top_p=get_float(body, "top_p", None, lo=0.0, hi=1.0),
        top_k=get_int(body, "top_k", None, lo=0, hi=100000),
        min_p=get_float(body, "min_p", None, lo=0.0, hi=1.0),
        frequency_penalty=get_float(body, "frequency_penalty", None, lo=-2.0, hi=2.0),
        presence_penalty=get_float(body, "presence_penalty", None, lo=-2.0, hi=2.0),
        repeat_penalty=get_float(body, "repeat_penalty", None, lo=0.0, hi=10.0),
        stop=get_stop(body),
        seed=seed,
        logit_bias=get_logit_bias(body) or None,
    )
    # A request that fixes its seed wants the same text every time: evaluate its prompt afresh.
    params["cache_prompt"] = seed is None
    params.update(_constraint(body))
    return params


def _constraint(body: dict[str, Any]) -> dict[str, Any]:
    """The output constraint of a body: ``grammar`` (GBNF, llama.cpp's extension), a top-level ``json_schema``
    (llama.cpp's), or ``response_format`` (OpenAI's ``json_object`` / ``json_schema``, and llama.cpp's
    ``json_object`` with a ``schema``). One of them at most; a grammar or schema that does not compile is the
    backend's 400."""
    grammar = get_str(body, "grammar", None) or None
    schema, field = body.get("json_schema"), "json_schema"
    if schema is not None and not isinstance(schema, (dict, bool)):
        raise invalid("json_schema", "must be a JSON schema object")
    fmt = body.get("response_format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise invalid("response_format", "type must be text, json_object or json_schema")
        if fmt["type"] != "text" and schema not in (None, False):
            raise invalid("response_format", 'either "json_schema" or "response_format" can be given, not both')
        if fmt["type"] == "json_object":
            schema, field = fmt.get("schema", {"type": "object"}), "response_format.schema"
        elif fmt["type"] == "json_schema":
            inner = fmt.get("json_schema")
            schema = inner.get("schema") if isinstance(inner, dict) else None
            field = "response_format.json_schema.schema"
            if schema is None:
                raise invalid(field, "must be a JSON schema object")
        if not isinstance(schema, (dict, bool)):
            raise invalid(field, "must be a JSON schema object")
    if schema is True or (schema == {} and field == "json_schema"):
        schema = None  # any value: no constraint (llama.cpp's json_schema {}, as on /completion)
    if grammar and schema not in (None, False):
        raise invalid("grammar", 'either a JSON schema or "grammar" can be given, not both')
    out: dict[str, Any] = {}
    if grammar:
        out["grammar"] = check_grammar(grammar)
    if isinstance(schema, dict):
        out["json_schema"] = check_json_schema(schema, field)
    return out


def parse_completion(body: dict[str, Any]) -> Job:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # OpenAI allows a one-element list
    if not isinstance(prompt, str):
        raise invalid("prompt", "is required and must be a string" if prompt is None else "must be a string")
    if not prompt:
        raise invalid("prompt", "must not be empty")
    if get_bool(body, "echo"):
        raise invalid("echo", "echo is not supported")
    params = TextParams(prompt=prompt, **_common_params(body))
    return Job(op="completion", model=get_model(body) or "", params=params, stream=get_bool(body, "stream"))


def parse_chat(body: dict[str, Any]) -> Job:
    params = TextParams(messages=get_messages(body), **_common_params(body))
    return Job(op="chat", model=get_model(body) or "", params=params, stream=get_bool(body, "stream"))


def include_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise invalid("stream_options", "must be an object")
    return get_bool(opts, "include_usage")


def _usage(result: TextResult) -> dict[str, Any]:
    p, c = result.prompt_tokens, result.completion_tokens
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": min(result.tokens_cached, p)}}


class OpenAIText:
    """Renders one text job as a completion or a chat completion, whole or as stream chunks."""

    done_marker = True

    def __init__(self, job: Job, *, usage_chunk: bool = False):
        self.job = job
        self.chat = job.op == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.usage_chunk = usage_chunk

    def _envelope(self, obj: str, choices: list, **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.job.model,
                "system_fingerprint": "velesio", "choices": choices, **extra}

    def render(self, result: TextResult) -> dict[str, Any]:
        text = result.text
        finish = result.finish_reason or "stop"
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish}
            return self._envelope("chat.completion", [choice], usage=_usage(result))
        choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
        return self._envelope("text_completion", [choice], usage=_usage(result))

    # ---- streaming ---------------------------------------------------------------------------
    def _chunk(self, delta_or_text: Any, finish: str | None) -> dict[str, Any]:
        extra = {"usage": None} if self.usage_chunk else {}
        if self.chat:
            choice = {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish}
            return self._envelope("chat.completion.chunk", [choice], **extra)
        choice = {"text": delta_or_text, "index": 0, "logprobs": None, "finish_reason": finish}
        return self._envelope("text_completion", [choice], **extra)

    def start(self) -> list[dict[str, Any]]:
        # llama.cpp's and OpenAI's first chat chunk: the role, and a null content
        return [self._chunk({"role": "assistant", "content": None}, None)] if self.chat else []

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        text = chunk.get("text")
        if not text:
            return []
        return [self._chunk({"content": text} if self.chat else text, None)]

    def end(self, result: TextResult) -> list[dict[str, Any]]:
        finish = result.finish_reason or "stop"
        events = [self._chunk({} if self.chat else "", finish)]
        if self.usage_chunk:
            obj = "chat.completion.chunk" if self.chat else "text_completion"
            events.append(self._envelope(obj, [], usage=_usage(result)))
        return events

    def error(self, err: ApiError) -> list[dict[str, Any]]:
        return [seed_error(err)]


def models_list(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """GET /v1/models."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "velesio",
         "meta": {k: v for k, v in m.get("meta", {}).items() if k in ("n_ctx", "n_ctx_train", "n_vocab", "size")}}
        for name, m in sorted(models.items())]}
