"""Embeddings requests (llama.cpp's /embeddings, OpenAI's /v1/embeddings) read into inputs, and the vectors
normalised and encoded as those APIs answer them. No HTTP here; the handlers are in routes.py.

An input is what llama.cpp's server accepts as one prompt: a string, an array of token ids, a mixed array of
both (``[12, "text", 34]``), ``{"prompt_string": "..."}`` or ``{"content": [{"type": "text", "text": ...}]}``.
A request carries one input, or a list of them. An empty input is a 400 (it would reach llama.cpp as a batch
of no tokens). Vectors are normalised as llama.cpp's ``embd_normalize`` says: -1 none, 0 scaled to the int16
range by the largest magnitude, 1 taxicab, 2 euclidean (the default), p > 2 the p-norm; ``encoding_format``
``base64`` (what the openai SDK sends by default) is the little-endian float32 bytes of the vector."""

from __future__ import annotations

import base64
import math
import struct
from typing import Any

from ...errors import invalid
from ...validation import get_int
from .completion import MAX_TOKEN_ID

Input = list[str | list[int]]  # one input: text pieces and token-id runs, in order

MAX_INPUTS = 2048  # OpenAI's limit on inputs per request


def _token(value: Any, field: str) -> int:
    if not 0 <= value <= MAX_TOKEN_ID:
        raise invalid(field, f"token ids must be between 0 and {MAX_TOKEN_ID}")
    return int(value)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object_input(value: dict[str, Any], field: str) -> Input:
    if isinstance(value.get("prompt_string"), str):
        return [value["prompt_string"]]
    parts = value.get("content")
    if isinstance(parts, list) and parts and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in parts):
        return ["".join(p["text"] for p in parts)]
    raise invalid(field, 'an object input needs "prompt_string", or "content" as an array of text parts')


def _one(value: Any, field: str) -> Input:
    """One input (not a list of inputs) as text pieces and token-id runs; 400 naming ``field``."""
    if isinstance(value, str):
        parts: Input = [value]
    elif isinstance(value, dict):
        parts = _object_input(value, field)
    elif isinstance(value, list):
        parts = []
        for i, item in enumerate(value):
            if _is_token(item):
                token = _token(item, f"{field}[{i}]")
                if parts and isinstance(parts[-1], list):
                    parts[-1].append(token)
                else:
                    parts.append([token])
            elif isinstance(item, str):
                parts.append(item)
            else:
                raise invalid(f"{field}[{i}]", "must be a token id or a string")
    else:
        raise invalid(field, "must be a string, an array of token ids, or an array of those")
    if not any(parts):
        raise invalid(field, "must not be empty")
    return parts


def inputs(value: Any, field: str) -> list[Input]:
    """The inputs of a request's ``input`` / ``content`` (llama.cpp's rules: an array with a token id in it is
    one input, an array of strings, arrays or objects is several)."""
    if value is None:
        raise invalid(field, "is required")
    if isinstance(value, list):
        if not value:
            raise invalid(field, "must not be empty")
        if any(_is_token(v) for v in value):
            return [_one(value, field)]
        if len(value) > MAX_INPUTS:
            raise invalid(field, f"at most {MAX_INPUTS} inputs per request")
        return [_one(v, f"{field}[{i}]") for i, v in enumerate(value)]
    return [_one(value, field)]


def normalise(vector: list[float], mode: int) -> list[float]:
    """llama.cpp's ``common_embd_normalize``: the vector divided by its norm (none for -1; a zero vector stays
    zero). The p-norm is computed on the vector scaled by its largest magnitude, so no power overflows."""
    if mode == -1 or not vector:
        return list(vector)
    top = max(abs(x) for x in vector)
    if not top > 0 or not math.isfinite(top):
        return [0.0] * len(vector) if not top > 0 else list(vector)
    if mode == 0:
        norm = top / 32760.0
    elif mode == 1:
        norm = math.fsum(abs(x) for x in vector)
    elif mode == 2:
        norm = top * math.sqrt(math.fsum((x / top) ** 2 for x in vector))
    else:
        norm = top * math.fsum((abs(x) / top) ** mode for x in vector) ** (1.0 / mode)
    return [x / norm for x in vector]


def normalise_mode(body: dict[str, Any]) -> int:
    """``embd_normalize``: -1, 0, 1, 2 (the default) or a p > 2."""
    return get_int(body, "embd_normalize", 2, lo=-1)


def encoding_format(body: dict[str, Any]) -> str:
    value = body.get("encoding_format")
    if value in (None, "float"):
        return "float"
    if value == "base64":
        return "base64"
    raise invalid("encoding_format", 'must be "float" or "base64"')


def encode(vector: list[float], fmt: str) -> list[float] | str:
    """The vector as the response carries it: floats, or base64 of its little-endian float32 bytes."""
    if fmt == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
    return vector
