"""Typed, range-checked reads of JSON request fields. Every failure is a 400 that names the field.

Every body is read here (``read_body``): within ``router.body_timeout_s``, so that a client that announces a
body and never sends it cannot hold a connection, and with a body that does not match its Content-Encoding
answered 400. Every integer of a JSON body is checked here once (``read_json``): one beyond what the mesh's
msgpack frames carry (below -2^63 or above 2^64 - 1) is a 400 naming where it is, whatever the field."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from .errors import ApiError, invalid
from .keys import CONFIG

_MISSING = object()

# What msgpack (the mesh's frames) can carry; every integer a job may hold fits here.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
# A field that names no bound of its own is held to a signed 64-bit integer.
INT64_MAX = 2**63 - 1
_LONG_NUMBER = re.compile(rb"[0-9]{19}")  # an integer of 19 digits or more may not fit in 64 bits
MAX_TOOL_CALLS = 128  # tool calls of one assistant message in a chat history


# Set on a request whose body could not be read: nothing reads it again (an error's dialect is then the route's).
BODY_FAILED = web.RequestKey("body_failed", bool)


async def read_body(request: web.Request) -> bytes:
    """The request body, decoded per its Content-Encoding; 408 when it does not arrive within
    ``router.body_timeout_s``, 400 when it does not match its Content-Encoding (or its framing)."""
    timeout = request.app[CONFIG].body_timeout_s if CONFIG in request.app else None
    if request.get(BODY_FAILED):
        raise ApiError("invalid_request", "the request body cannot be read")
    try:
        if request.content.is_eof() or not timeout or timeout <= 0:
            return await request.read()  # all of it has arrived (the usual small body): no timer task needed
        return await asyncio.wait_for(request.read(), timeout)
    except asyncio.TimeoutError:
        request[BODY_FAILED] = True
        raise ApiError("request_timeout", f"the request body did not arrive within {timeout:g} s") from None
    except (RequestPayloadError, HttpProcessingError) as exc:
        request[BODY_FAILED] = True
        reason = re.sub(r"^\s*\d{3}, message:\s*", "", str(getattr(exc, "message", None) or exc))
        encoding = request.headers.get("Content-Encoding")
        what = f"does not match its Content-Encoding ({encoding})" if encoding else "cannot be read"
        raise ApiError("invalid_request", f"the request body {what}: {' '.join(reason.split())[:200]}") from None


def check_integers(value: Any, where: str = "") -> None:
    """400 naming the first integer in ``value`` (a parsed JSON body) that the mesh cannot carry."""
    todo: list[tuple[str, Any]] = [(where, value)]
    while todo:
        path, item = todo.pop()
        if isinstance(item, int) and not isinstance(item, bool):
            if not INT_MIN <= item <= INT_MAX:
                raise invalid(path or "body", "integer out of range (at most 64 bits)")
        elif isinstance(item, dict):
            todo.extend((f"{path}.{k}" if path else str(k), v) for k, v in item.items())
        elif isinstance(item, list):
            todo.extend((f"{path}[{i}]", v) for i, v in enumerate(item))


async def read_json(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request body as a JSON object. An empty body is ``{}`` when allowed."""
    raw = await read_body(request)
    if not raw.strip():
        if allow_empty:
            return {}
        raise ApiError("invalid_request", "request body is empty; a JSON object is required")
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError("invalid_request", "malformed JSON in request body", str(exc)) from None
    except RecursionError:
        raise ApiError("invalid_request", "malformed JSON in request body", "nested too deeply") from None
    if not isinstance(body, dict):
        raise ApiError("invalid_request", "request body must be a JSON object")
    if b"\\ud" in raw.lower():  # only a \uD800-\uDFFF escape can smuggle in a lone surrogate
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ApiError("invalid_request", "request body has an invalid unicode escape (lone surrogate)") from None
    if _LONG_NUMBER.search(raw):  # only then can an integer be out of range: skip the walk otherwise
        check_integers(body)
    return body


def get_int(body: dict, name: str, default: Any = _MISSING, *, lo: int | None = None,
            hi: int | None = None) -> Any:
    """An integer field (a float with no fraction is accepted); bounded by ``lo``/``hi``, and by a signed
    64-bit integer where they leave a side open."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise invalid(name, "is required")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, f"must be an integer, got {type(value).__name__}")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise invalid(name, "must be an integer")
        value = int(value)
    low = -(2**63) if lo is None else lo
    high = INT64_MAX if hi is None else hi
    if value < low:
        raise invalid(name, f"must be >= {low}")
    if value > high:
        raise invalid(name, f"must be <= {high}")
    return value


def get_float(body: dict, name: str, default: Any = _MISSING, *, lo: float | None = None,
              hi: float | None = None) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise invalid(name, "is required")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise invalid(name, "must be a number")
    try:
        value = float(value)  # an integer literal of 400 digits does not fit: OverflowError
    except OverflowError:
        raise invalid(name, "is too large") from None
    if not math.isfinite(value):
        raise invalid(name, "must be a finite number")
    if lo is not None and value < lo:
        raise invalid(name, f"must be between {lo} and {hi}" if hi is not None else f"must be >= {lo}")
    if hi is not None and value > hi:
        raise invalid(name, f"must be between {lo} and {hi}" if lo is not None else f"must be <= {hi}")
    return float(value)


def get_bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name, None)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, "must be true or false")
    return value


def get_str(body: dict, name: str, default: Any = _MISSING, *, allow_empty: bool = True) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise invalid(name, "is required")
        return default
    if not isinstance(value, str):
        raise invalid(name, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise invalid(name, "must not be empty")
    return value


def get_stop(body: dict, name: str = "stop") -> list[str]:
    """``stop``: null, a string, or a list of up to 16 strings."""
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise invalid(name, "must be a string or an array of strings")
    if len(value) > 16:
        raise invalid(name, "at most 16 stop sequences")
    return [s for s in value if s]


_ROLES = ("system", "user", "assistant", "developer", "tool", "function")


def _text_content(content: Any, where: str) -> str:
    """A message's content as text: a string, OpenAI's text content parts joined, or "" for null."""
    if content is None:
        return ""
    if isinstance(content, list):  # OpenAI content parts: keep the text parts
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(where, "only text content parts are supported")
            texts.append(part["text"])
        return "".join(texts)
    if not isinstance(content, str):
        raise invalid(where, "must be a string")
    return content


def _tool_call(call: Any, where: str) -> dict[str, str]:
    """One of an assistant message's ``tool_calls`` as ``{"id", "name", "arguments"}`` (arguments the JSON
    text OpenAI sends; an object is accepted and written as JSON). The dialect renders it into the prompt."""
    if not isinstance(call, dict) or call.get("type", "function") != "function" or not isinstance(
            call.get("function"), dict):
        raise invalid(where, 'must be {"id", "type": "function", "function": {"name", "arguments"}}')
    function = call["function"]
    name, arguments = function.get("name"), function.get("arguments")
    if not isinstance(name, str) or not name:
        raise invalid(f"{where}.function.name", "must be a non-empty string")
    if arguments is None or isinstance(arguments, dict):
        arguments = json.dumps(arguments or {}, ensure_ascii=False)
    if not isinstance(arguments, str):
        raise invalid(f"{where}.function.arguments", "must be a string of JSON")
    call_id = call.get("id", "")
    if not isinstance(call_id, str):
        raise invalid(f"{where}.id", "must be a string")
    return {"id": call_id, "name": name, "arguments": arguments}


def _tool_fields(msg: dict, role: str, where: str) -> dict[str, Any]:
    """The tool-calling fields of a message: an assistant's ``tool_calls`` (or the legacy ``function_call``),
    a ``tool`` (or legacy ``function``) result's ``tool_call_id`` and ``name``."""
    out: dict[str, Any] = {}
    if role == "assistant":
        calls = msg.get("tool_calls")
        if msg.get("function_call") is not None and calls is None:  # the legacy form of one call
            calls = [{"type": "function", "function": msg["function_call"]}]
        if calls is not None:
            if not isinstance(calls, list) or len(calls) > MAX_TOOL_CALLS:
                raise invalid(f"{where}.tool_calls", f"must be an array of at most {MAX_TOOL_CALLS} tool calls")
            out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)]
    elif role in ("tool", "function"):
        for key in ("tool_call_id", "name"):
            value = msg.get(key)
            if value is not None and not isinstance(value, str):
                raise invalid(f"{where}.{key}", "must be a string")
            if value:
                out[key] = value
    return out


def get_messages(body: dict, name: str = "messages", *, tool_fields: bool = False) -> list[dict[str, Any]]:
    """``messages`` as ``[{"role", "content"}]``, content a string. With ``tool_fields`` an assistant
    message keeps its ``tool_calls`` (content may then be null) and a ``tool`` message its ``tool_call_id``
    and ``name``, for the OpenAI dialect to render into the prompt; without, they are dropped. ``developer``
    is ``system``; the legacy ``function`` role is ``tool``."""
    value = body.get(name)
    if value is None:
        raise invalid(name, "is required")
    if not isinstance(value, list) or not value:
        raise invalid(name, "must be a non-empty array of {role, content} objects")
    messages = []
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise invalid(where, "must be an object with role and content")
        role = msg.get("role")
        if role not in _ROLES:
            raise invalid(f"{where}.role", "must be one of system, user, assistant, developer, tool")
        out: dict[str, Any] = {"role": {"developer": "system", "function": "tool"}.get(role, role),
                               "content": _text_content(msg.get("content"), f"{where}.content")}
        if tool_fields:
            out.update(_tool_fields(msg, role, where))
        messages.append(out)
    return messages


def get_continuation(body: dict, messages: list[dict[str, Any]]) -> bool:
    """Whether a chat that ends with an assistant message continues it (assistant prefill, llama.cpp's
    default; ``continue_final_message``, vLLM's explicit form) rather than closing it and opening a new
    turn; the rendered prompt then ends with that message's text. 400 for what llama.cpp refuses:
    ``continue_final_message`` with ``add_generation_prompt`` true, or without a final assistant message, and
    two assistant messages at the end."""
    continue_final = get_bool(body, "continue_final_message")
    add_prompt = body.get("add_generation_prompt")
    if continue_final and add_prompt is True:
        raise invalid("continue_final_message", "cannot be true together with add_generation_prompt")
    ends_with_assistant = messages[-1]["role"] == "assistant"
    if continue_final and not ends_with_assistant:
        raise invalid("continue_final_message", "needs a final assistant message to continue")
    if ends_with_assistant and len(messages) > 1 and messages[-2]["role"] == "assistant":
        raise invalid("messages", "cannot end with two or more assistant messages")
    return ends_with_assistant and (continue_final or add_prompt is not False)


def get_model(body: dict) -> str | None:
    return get_str(body, "model", None) or None


# ---- grammars and JSON schemas ----------------------------------------------------------------
# llama.cpp parses a grammar by recursive descent: nesting in the tens of thousands overflows its stack and
# kills the backend process (SIGSEGV), and a JSON schema's "maxLength" or a "pattern" quantifier compiles to
# that much nesting. Beyond llama.cpp's own repetition threshold (2000) it refuses them anyway; refuse here
# from a depth it still parses, so that nothing deeper reaches it.
MAX_GRAMMAR_DEPTH = 1000
_GBNF_TOKENS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|#[^\n]*|[()]')
_REGEX_BOUNDS = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _depth(text: str, tokens: re.Pattern[str]) -> int:
    depth = deepest = 0
    for match in tokens.finditer(text):
        token = match.group()
        if token == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif token == ")":
            depth = max(0, depth - 1)
    return deepest


def check_grammar(text: str, field: str = "grammar") -> str:
    """A GBNF grammar nested no deeper than llama.cpp's parser can take; 400 naming ``field`` otherwise."""
    deepest = _depth(text, _GBNF_TOKENS)
    if deepest > MAX_GRAMMAR_DEPTH:
        raise invalid(field, f"is nested {deepest} levels deep; at most {MAX_GRAMMAR_DEPTH}")
    return text


_REGEX_TOKENS = re.compile(r"\\.|\[(?:\\.|[^\]\\])*\]|[()]")


def check_json_schema(schema: Any, field: str = "json_schema") -> Any:
    """A JSON schema whose grammar llama.cpp can parse: no ``maxLength`` and no ``pattern`` repetition bound
    beyond ``MAX_GRAMMAR_DEPTH`` (each compiles to that much nesting), no ``pattern`` nested deeper."""
    todo: list[tuple[str, Any]] = [(field, schema)]
    while todo:
        path, item = todo.pop()
        if isinstance(item, list):
            todo.extend((f"{path}[{i}]", v) for i, v in enumerate(item))
            continue
        if not isinstance(item, dict):
            continue
        for key, value in item.items():
            where = f"{path}.{key}"
            if key == "maxLength" and isinstance(value, int) and value > MAX_GRAMMAR_DEPTH:
                raise invalid(where, f"at most {MAX_GRAMMAR_DEPTH} (a longer bound compiles to a grammar llama.cpp "
                                     "cannot parse)")
            if key == "pattern" and isinstance(value, str):
                bounds = [int(n) for m in _REGEX_BOUNDS.finditer(value) for n in m.groups() if n]
                if (bounds and max(bounds) > MAX_GRAMMAR_DEPTH) or _depth(value, _REGEX_TOKENS) > MAX_GRAMMAR_DEPTH:
                    raise invalid(where, f"repetition bounds and nesting at most {MAX_GRAMMAR_DEPTH}")
            if isinstance(value, (dict, list)):
                todo.append((where, value))
    return schema


MAX_LOGIT_BIASES = 1024  # entries of one request's logit_bias


def get_logit_bias(body: dict, name: str = "logit_bias") -> list[list[Any]]:
    """``logit_bias`` in OpenAI's form (``{"<token id>": bias}``) or llama.cpp's (``[[id or string, bias or
    false], ...]``, or an object whose keys are ids or strings) as ``[[id or string, bias or None], ...]``:
    None (``false``) bans the token; a string stands for each of its tokens. Biases are finite numbers."""
    value = body.get(name)
    if value is None:
        return []
    if isinstance(value, dict):
        entries = list(value.items())
    elif isinstance(value, list):
        entries = []
        for i, pair in enumerate(value):
            if not isinstance(pair, list) or len(pair) != 2:
                raise invalid(f"{name}[{i}]", "must be a [token, bias] pair")
            entries.append((pair[0], pair[1]))
    else:
        raise invalid(name, "must be an object of token ids to biases, or a list of [token, bias] pairs")
    if len(entries) > MAX_LOGIT_BIASES:
        raise invalid(name, f"at most {MAX_LOGIT_BIASES} entries")
    out: list[list[Any]] = []
    for key, bias in entries:
        where = f"{name}[{key!r}]"
        if isinstance(key, str) and key.strip().lstrip("-").isdigit() and len(key.strip()) < 12:
            key = int(key.strip())
        if isinstance(key, bool) or not isinstance(key, (int, str)) or (isinstance(key, str) and not key):
            raise invalid(where, "the token must be an id or a non-empty string")
        if isinstance(key, int) and not 0 <= key < 2**31:
            raise invalid(where, "token ids are between 0 and 2^31")
        if bias is False:
            out.append([key, None])
            continue
        number = get_float({"bias": bias}, "bias", lo=-1e6, hi=1e6) if not isinstance(bias, bool) else None
        if number is None:
            raise invalid(where, "the bias must be a number, or false to ban the token")
        out.append([key, number])
    return out
