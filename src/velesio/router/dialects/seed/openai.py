"""The seed's and OpenAI's text shapes: /completion (seed), /chat/completions, /v1/completions,
/v1/chat/completions. The seed's shapes are a subset of OpenAI's, so one dialect serves both.

Request fields are handled per field (docs/clients.md): ``echo`` and ``best_of`` > 1 are refused with 400;
``n`` and a list of prompts make one job per choice (``OpenAIChoices``, run by relay.respond_choices);
``logprobs`` / ``top_logprobs`` are rendered by dialects/logprobs.py; ``user``, ``suffix``, ``store``,
``metadata`` and other unknown fields are ignored; ``tools``, ``tool_choice`` and ``parallel_tool_calls`` (and
the legacy ``functions`` / ``function_call``) are served by seed/tools.py, the generic JSON way llama.cpp
serves any chat template; ``response_format`` json_object / json_schema, and llama.cpp's ``grammar`` and
``json_schema``, constrain the output with a grammar."""

from __future__ import annotations

import time
import uuid
from typing import Any

from velesio import __version__
from velesio.mesh.jobs import Job
from velesio.mesh.params import MAX_TOKENS, TextParams, TextResult

from ...admission import MAX_CHOICES
from ...errors import ApiError, invalid
from ...validation import (
    check_grammar,
    check_json_schema,
    get_bool,
    get_continuation,
    get_float,
    get_int,
    get_logit_bias,
    get_messages,
    get_model,
    get_stop,
    get_str,
)
from .. import logprobs
from ..base import seed_error
from ..llamacpp.completion import timings
from . import tools


def _given(**fields: Any) -> dict[str, Any]:
    """The fields a request named (None: not named, the mesh default applies)."""
    return {k: v for k, v in fields.items() if v is not None}


def _common_params(body: dict[str, Any]) -> dict[str, Any]:
    """The sampling fields of a seed / OpenAI body, each checked against the API's range."""
    max_tokens = get_int(body, "max_completion_tokens", None, lo=1, hi=MAX_TOKENS)
    if max_tokens is None:
        max_tokens = get_int(body, "max_tokens", None, lo=1, hi=MAX_TOKENS)
    if get_int(body, "best_of", 1, lo=1) != 1:
        raise invalid("best_of", "only best_of=1 is supported")
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


# llama.cpp's server names its build, "b<build>-<commit>"; we name ours the same way
SYSTEM_FINGERPRINT = f"b{__version__}-velesio"
MAX_TOP_LOGPROBS = 20  # OpenAI's bound on top_logprobs (its legacy completions allow 5; we allow 20 there too)


def _chat_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI chat's ``logprobs`` (a boolean) and ``top_logprobs`` (alternatives per token, 0 to 20, only
    with ``logprobs``) as the job's ``logprobs`` count."""
    top = get_int(body, "top_logprobs", None, lo=0, hi=MAX_TOP_LOGPROBS)
    if not get_bool(body, "logprobs"):
        if top is not None:
            raise invalid("top_logprobs", "requires logprobs to be true")
        return {}
    return {"logprobs": top or 0, "post_sampling_probs": get_bool(body, "post_sampling_probs")}


def _completion_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """OpenAI legacy completions' ``logprobs``: the number of alternatives per token (0 to 20; ``true`` is
    0, llama.cpp's ``top_logprobs`` then gives the number)."""
    value = body.get("logprobs")
    if value is None or value is False:
        return {}
    if value is True:
        n = get_int(body, "top_logprobs", 0, lo=0, hi=MAX_TOP_LOGPROBS)
    else:
        n = get_int(body, "logprobs", lo=0, hi=MAX_TOP_LOGPROBS)
    return {"logprobs": n, "post_sampling_probs": get_bool(body, "post_sampling_probs")}


def completion_prompts(body: dict[str, Any]) -> list[str]:
    """A legacy completion's prompts: a string, or a list of strings (one choice, or ``n``, each)."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise invalid("prompt", "is required" if prompt is None else "must be a string or a list of strings")
    if len(prompts) > MAX_CHOICES:
        raise invalid("prompt", f"at most {MAX_CHOICES} prompts in one request")
    if not all(prompts):
        raise invalid("prompt", "must not be empty")
    return prompts


def parse_completion(body: dict[str, Any]) -> Job:
    """The job of a legacy completion's first prompt (``completion_prompts`` has them all)."""
    prompts = completion_prompts(body)
    if get_bool(body, "echo"):
        raise invalid("echo", "echo is not supported")
    params = TextParams(prompt=prompts[0], **_common_params(body), **_completion_logprobs(body))
    return Job(op="completion", model=get_model(body) or "", params=params, stream=get_bool(body, "stream"))


def parse_chat(body: dict[str, Any]) -> Job:
    plan = tools.get_plan(body)  # tool calling (seed/tools.py): None when the model is to call no tool
    given = get_messages(body, tool_fields=True)
    continue_final = get_continuation(body, given) and not given[-1].get("tool_calls")
    messages = tools.prompt_messages(given, plan)
    params = TextParams(messages=messages, continue_final_message=continue_final,
                        **tools.constrain(_common_params(body), plan), **_chat_logprobs(body))
    job = Job(op="chat", model=get_model(body) or "", params=params, stream=get_bool(body, "stream"))
    if plan is not None and job.stream and params.logprobs is not None:
        # a stream with tools is sent whole at its end (seed/tools.py): no piece to hang probabilities on
        raise invalid("logprobs", "is not supported with tools in a stream (as llama.cpp)")
    return tools.with_plan(job, plan)


def include_usage(body: dict[str, Any]) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise invalid("stream_options", "must be an object")
    return get_bool(opts, "include_usage")


def _usage(result: TextResult) -> dict[str, Any]:
    return _usage_of(result.prompt_tokens, result.completion_tokens, min(result.tokens_cached, result.prompt_tokens))


def _usage_of(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    """OpenAI's ``usage`` (with ``prompt_tokens_details.cached_tokens``)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class OpenAIText:
    """Renders one text job as a completion or a chat completion, whole or as stream chunks."""

    done_marker = True

    def __init__(self, job: Job, *, usage_chunk: bool = False, index: int = 0):
        self.job = job
        self.chat = job.op == "chat"
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.usage_chunk = usage_chunk
        self.usage_at_end = usage_chunk  # end() adds the usage chunk (OpenAIChoices adds one for all instead)
        self.index = index  # the choice's index (n > 1, several prompts)
        self.text_offset = 0  # legacy completions' logprobs: where the next tokens' text starts
        self.tools = tools.plan_of(job)
        self.tool_text: list[str] = []  # a stream with tools: its text, read whole at the end

    def _envelope(self, obj: str, choices: list, **extra: Any) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.job.model,
                "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices, **extra}

    def render(self, result: TextResult) -> dict[str, Any]:
        text = result.text
        finish = result.finish_reason or "stop"
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": text}
            if self.tools:
                message, finish = tools.message(text, finish, self.tools)
            choice = {"index": self.index, "message": message, "logprobs": self._logprobs(result.probs),
                      "finish_reason": finish}
            return self._envelope("chat.completion", [choice], usage=_usage(result), timings=timings(result))
        choice = {"text": text, "index": self.index, "logprobs": self._logprobs(result.probs), "finish_reason": finish}
        return self._envelope("text_completion", [choice], usage=_usage(result), timings=timings(result))

    # ---- streaming ---------------------------------------------------------------------------
    def _logprobs(self, probs: Any) -> dict[str, Any] | None:
        """The ``logprobs`` of a choice: None unless the request asked for them."""
        if self.job.params.logprobs is None:  # type: ignore[union-attr]
            return None
        if self.chat:
            return logprobs.chat(probs)
        out = logprobs.completion(probs, self.text_offset)
        self.text_offset += sum(len(t) for t in out["tokens"])
        return out

    def _chunk(self, delta_or_text: Any, finish: str | None, probs: Any = None) -> dict[str, Any]:
        extra = {"usage": None} if self.usage_chunk else {}
        logprobs_of = self._logprobs(probs) if probs else None
        if self.chat:
            choice = {"index": self.index, "delta": delta_or_text, "logprobs": logprobs_of, "finish_reason": finish}
            return self._envelope("chat.completion.chunk", [choice], **extra)
        choice = {"text": delta_or_text, "index": self.index, "logprobs": logprobs_of, "finish_reason": finish}
        return self._envelope("text_completion", [choice], **extra)

    def start(self) -> list[dict[str, Any]]:
        # llama.cpp's and OpenAI's first chat chunk: the role, and a null content
        return [self._chunk({"role": "assistant", "content": None}, None)] if self.chat else []

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        text = chunk.get("text")
        if not text:
            return []
        if self.tools:  # a reply that may be tool calls is only known whole: buffered until end()
            self.tool_text.append(text)
            return []
        return [self._chunk({"content": text} if self.chat else text, None, chunk.get("probs"))]

    def end(self, result: TextResult) -> list[dict[str, Any]]:
        finish = result.finish_reason or "stop"
        events = []
        if self.tools:  # the buffered reply: tool-call deltas, or its content
            found, finish = tools.deltas("".join(self.tool_text) or result.text, finish, self.tools)
            events = [self._chunk(delta, None) for delta in found]
        events.append(self._chunk({} if self.chat else "", finish))
        if self.usage_at_end:
            events.append(self.usage_event(_usage(result), timings(result)))
        return events

    def usage_event(self, usage: dict[str, Any], times: dict[str, Any] | None = None) -> dict[str, Any]:
        """``stream_options.include_usage``'s last chunk: no choices, the usage (and, as llama.cpp sends it,
        the job's ``timings``)."""
        extra = {"timings": times} if times else {}
        return self._envelope("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage,
                              **extra)

    def error(self, err: ApiError) -> list[dict[str, Any]]:
        return [seed_error(err)]


def models_list(models: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """GET /v1/models."""
    return {"object": "list", "data": [
        {"id": name, "object": "model", "created": 0, "owned_by": "velesio",
         "meta": {k: v for k, v in m.get("meta", {}).items() if k in ("n_ctx", "n_ctx_train", "n_vocab", "size")}}
        for name, m in sorted(models.items())]}


class OpenAIChoices:
    """Several choices of one request (``n`` > 1, several prompts of a legacy completion): one job each,
    answered as one response whose ``choices`` carry their indexes. ``prompt_of[i]`` is the prompt job ``i``
    continues: usage counts each prompt's tokens once and every choice's completion tokens."""

    done_marker = True

    def __init__(self, jobs: list[Job], prompt_of: list[int], *, usage_chunk: bool = False):
        self.each = [OpenAIText(job, usage_chunk=usage_chunk, index=i) for i, job in enumerate(jobs)]
        first = self.each[0]
        for r in self.each:
            r.id, r.created, r.usage_at_end = first.id, first.created, False
        self.prompt_of = prompt_of
        self.usage_chunk = usage_chunk

    def _usage(self, results: list[TextResult]) -> dict[str, Any]:
        prompts = {self.prompt_of[i]: r for i, r in enumerate(results)}  # one result per prompt
        return _usage_of(sum(r.prompt_tokens for r in prompts.values()), sum(r.completion_tokens for r in results),
                         sum(min(r.tokens_cached, r.prompt_tokens) for r in prompts.values()))

    def render(self, results: list[TextResult]) -> dict[str, Any]:
        bodies = [r.render(result) for r, result in zip(self.each, results, strict=True)]
        return {**bodies[0], "choices": [c for b in bodies for c in b["choices"]], "usage": self._usage(results)}

    def start(self) -> list[dict[str, Any]]:
        return [event for r in self.each for event in r.start()]

    def chunk(self, i: int, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        return self.each[i].chunk(chunk)

    def end(self, i: int, result: TextResult) -> list[dict[str, Any]]:
        return self.each[i].end(result)

    def finish(self, results: list[TextResult]) -> list[dict[str, Any]]:
        return [self.each[0].usage_event(self._usage(results))] if self.usage_chunk else []

    def error(self, err: ApiError) -> list[dict[str, Any]]:
        return [seed_error(err)]
