"""What a dialect is: one HTTP API's shapes (the seed's and OpenAI's, llama.cpp's, AUTOMATIC1111's) as one
object: its routes, which parse requests into typed jobs and render results, and the shape of its errors.
Dialects are registered in one place, dialects/__init__.py; the errors middleware asks the request's dialect
for the error body."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from ..errors import ApiError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclasses.dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler


@dataclasses.dataclass(frozen=True)
class Dialect:
    name: str
    routes: tuple[Route, ...]
    error_body: Callable[[ApiError], dict[str, Any]]
    # Paths under this prefix are the dialect's even without a route (their 404 and 405 take its shape).
    prefix: str | None = None
    # A route two dialects share answers in the seed's shape unless the body says otherwise; for an error
    # raised before the handler read the body (401, 429), this reads it and names the dialect it is in.
    sniff: Callable[[web.Request], Awaitable[Dialect | None]] | None = None
    # Per-application state the dialect keeps (A1111's options and tracked jobs).
    setup: Callable[[web.Application], None] | None = None

    def owns(self, path: str) -> bool:
        return any(r.path == path for r in self.routes) or bool(self.prefix and path.startswith(self.prefix))


# The dialect a handler chose for this request (set when one route serves two dialects, e.g. /completion).
CHOSEN = web.RequestKey("dialect", Dialect)


def seed_error(err: ApiError) -> dict[str, Any]:
    """The seed's error shape (OpenAI's keys with the seed's string ``code``)."""
    return {"error": {"code": err.code, "message": err.message, "details": err.details, "type": err.type,
                      "param": err.param, **err.extra}}
