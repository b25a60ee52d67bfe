"""Typed, range-checked reads of JSON request fields. Every failure is a 400 that names the field."""

from __future__ import annotations

import json
import math
from typing import Any

from aiohttp import web

from .errors import ApiError, invalid

_MISSING = object()


async def read_json(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The request body as a JSON object. An empty body is ``{}`` when allowed."""
    raw = await request.read()
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
    return body


def get_int(body: dict, name: str, default: Any = _MISSING, *, lo: int | None = None,
            hi: int | None = None) -> Any:
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
    if lo is not None and value < lo:
        raise invalid(name, f"must be >= {lo}")
    if hi is not None and value > hi:
        raise invalid(name, f"must be <= {hi}")
    return value


def get_float(body: dict, name: str, default: Any = _MISSING, *, lo: float | None = None,
              hi: float | None = None) -> Any:
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise invalid(name, "is required")
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(name, "must be a number")
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


def get_messages(body: dict, name: str = "messages") -> list[dict[str, str]]:
    value = body.get(name)
    if value is None:
        raise invalid(name, "is required")
    if not isinstance(value, list) or not value:
        raise invalid(name, "must be a non-empty array of {role, content} objects")
    messages = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise invalid(f"{name}[{i}]", "must be an object with role and content")
        role = msg.get("role")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise invalid(f"{name}[{i}].role", "must be one of system, user, assistant")
        content = msg.get("content")
        if content is None:
            content = ""
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise invalid(f"{name}[{i}].content", "only text content parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise invalid(f"{name}[{i}].content", "must be a string")
        messages.append({"role": "system" if role == "developer" else role, "content": content})
    return messages


def get_model(body: dict) -> str | None:
    return get_str(body, "model", None) or None
