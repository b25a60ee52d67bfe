"""The router's errors. Raised anywhere; turned into a response in one place (router/middleware.py), where
each dialect only chooses the body's shape."""

from __future__ import annotations

import re
from typing import Any

# code -> (HTTP status, llama.cpp / OpenAI style "type")
CODES: dict[str, tuple[int, str]] = {
    "invalid_request": (400, "invalid_request_error"),
    "context_exceeded": (400, "exceed_context_size_error"),
    "unauthorized": (401, "authentication_error"),
    "forbidden": (403, "permission_error"),
    "not_found": (404, "not_found_error"),
    "model_not_found": (404, "not_found_error"),
    "method_not_allowed": (405, "invalid_request_error"),
    "conflict": (409, "invalid_request_error"),  # the operator API: a model that exists, or is being changed
    "request_timeout": (408, "invalid_request_error"),
    "payload_too_large": (413, "invalid_request_error"),
    "unsupported_media_type": (415, "invalid_request_error"),
    "rate_limited": (429, "rate_limit_error"),
    "cancelled": (499, "server_error"),
    "internal_error": (500, "server_error"),
    "load_failed": (500, "server_error"),  # the operator API: the backend could not load the model
    "job_crashed_backend": (500, "server_error"),
    "not_supported": (501, "not_supported_error"),
    "insufficient_memory": (507, "server_error"),  # a model that does not fit in the worker's free memory
    "queue_full": (503, "unavailable_error"),
    "no_worker": (503, "unavailable_error"),
    "busy": (503, "unavailable_error"),
    "shutting_down": (503, "unavailable_error"),
    "timeout": (504, "server_error"),
}


class ApiError(Exception):
    """An error with a seed error code; ``status`` follows from the code unless given. ``extra`` are keys
    every dialect adds to its error object (llama.cpp's ``n_prompt_tokens`` and ``n_ctx`` of a context error)."""

    def __init__(self, code: str, message: str, details: Any = None, *, param: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        if code not in CODES:
            code = "internal_error"
        self.code = code
        self.message = message
        self.details = details
        self.param = param
        self.status = status or CODES[code][0]
        self.type = CODES[code][1]
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


def invalid(param: str, message: str) -> ApiError:
    return ApiError("invalid_request", f"{param}: {message}", param=param)


_PROMPT_TOKENS = re.compile(r"prompt is (\d+) tokens")
_CONTEXT_TOKENS = re.compile(r"context of (\d+) tokens")
CONTEXT_MESSAGE = "the request exceeds the available context size"  # llama.cpp's words


def _int_of(details: Any, key: str, pattern: re.Pattern[str], message: str) -> int | None:
    value = details.get(key) if isinstance(details, dict) else None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    found = pattern.search(message)
    return int(found.group(1)) if found else None


def context_exceeded(err: ApiError, n_ctx: int | None = None) -> ApiError:
    """A ``context_exceeded`` error with llama.cpp's ``n_prompt_tokens`` and ``n_ctx`` (from its details, else
    from the backend's message "the prompt is N tokens ... a context of M tokens", else ``n_ctx``) in every
    dialect's error object and in ``details``; other errors are returned unchanged."""
    if err.code != "context_exceeded":
        return err
    n_prompt = _int_of(err.details, "n_prompt_tokens", _PROMPT_TOKENS, err.message)
    ctx = _int_of(err.details, "n_ctx", _CONTEXT_TOKENS, err.message) or n_ctx
    fields = {k: v for k, v in (("n_prompt_tokens", n_prompt), ("n_ctx", ctx)) if v}
    err.extra = {**fields, **err.extra}
    err.details = {**fields, **err.details} if isinstance(err.details, dict) else (err.details or fields or None)
    if CONTEXT_MESSAGE not in err.message:
        err.message = f"{CONTEXT_MESSAGE}: {err.message}"
    return err
