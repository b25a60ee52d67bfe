"""The router's HTTP dialects, registered here and nowhere else. Each is one object (dialects/base.py) that
brings its routes, its request parsing into typed jobs (velesio.mesh.params), its renderers and its error
shape:

- ``seed``: the seed API's own shapes and OpenAI's (/completion, /chat/completions, /v1/*);
- ``llamacpp``: llama.cpp's server (/completion with llama.cpp fields, /tokenize, /props, /embeddings ...);
- ``a1111``: AUTOMATIC1111's /sdapi/v1/*.

Routes outside the dialects (/health, /models, /queue/status, /metrics, the dashboard) answer errors in the
seed's shape."""

from __future__ import annotations

from aiohttp import web

from . import a1111, llamacpp, seed
from .base import CHOSEN, Dialect

DIALECTS: tuple[Dialect, ...] = (seed.DIALECT, llamacpp.DIALECT, a1111.DIALECT)
DEFAULT = seed.DIALECT

_ROUTES = web.AppKey("dialect_routes", dict)  # aiohttp route -> Dialect


def setup(app: web.Application) -> None:
    routes: dict[object, Dialect] = {}
    for dialect in DIALECTS:
        if dialect.setup is not None:
            dialect.setup(app)
        for r in dialect.routes:
            routes[app.router.add_route(r.method, r.path, r.handler)] = dialect
    app[_ROUTES] = routes


async def dialect_of(request: web.Request) -> Dialect:
    """The dialect whose shape this request's errors take."""
    chosen = request.get(CHOSEN)
    if chosen is not None:
        return chosen
    dialect = request.app[_ROUTES].get(request.match_info.route)
    if dialect is None:  # no route matched (404, 405): the dialect that owns the path
        dialect = next((d for d in DIALECTS if d.owns(request.path)), DEFAULT)
    if dialect.sniff is not None:
        dialect = await dialect.sniff(request) or dialect
    return dialect
