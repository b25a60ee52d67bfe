"""AUTOMATIC1111's API (``/sdapi/v1/*``, what ``webuiapi`` and A1111 clients speak; the seed's image routes
are its txt2img and img2img): parse.py reads bodies into typed image jobs, render.py writes A1111's
responses, models.py matches checkpoints and samplers, routes.py has the handlers. Errors: the seed's shape
plus a top-level ``detail`` (what A1111's FastAPI answers)."""

from __future__ import annotations

from typing import Any

from ...errors import ApiError
from ..base import Dialect, Route, seed_error
from . import routes


def error_body(err: ApiError) -> dict[str, Any]:
    return {**seed_error(err), "detail": err.message}


DIALECT = Dialect(
    name="a1111",
    routes=tuple(Route(method, f"{routes.PREFIX}/{name}", handler) for method, name, handler in routes.ROUTES),
    error_body=error_body,
    prefix="/sdapi/",
    setup=routes.setup,
)
