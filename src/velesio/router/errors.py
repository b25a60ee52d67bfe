"""The router's errors. Raised anywhere; turned into a response in one place (router/middleware.py), where
each dialect only chooses the body's shape."""

from __future__ import annotations

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
    "payload_too_large": (413, "invalid_request_error"),
    "rate_limited": (429, "rate_limit_error"),
    "cancelled": (499, "server_error"),
    "internal_error": (500, "server_error"),
    "job_crashed_backend": (500, "server_error"),
    "not_supported": (501, "not_supported_error"),
    "queue_full": (503, "unavailable_error"),
    "no_worker": (503, "unavailable_error"),
    "busy": (503, "unavailable_error"),
    "shutting_down": (503, "unavailable_error"),
    "timeout": (504, "server_error"),
}


class ApiError(Exception):
    """An error with a seed error code; ``status`` follows from the code unless given."""

    def __init__(self, code: str, message: str, details: Any = None, *, param: str | None = None,
                 status: int | None = None, headers: dict[str, str] | None = None):
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


def invalid(param: str, message: str) -> ApiError:
    return ApiError("invalid_request", f"{param}: {message}", param=param)
