"""``GET /dashboard``: a static page that shows the mesh at a glance and has a small playground.

The page and its two assets are plain files in ``router/static/`` (no build step, no external assets) and
are served without a token: the page itself asks for the API token, keeps it in ``sessionStorage`` only,
and sends it as ``Authorization: Bearer`` on the API calls it makes (``/health``, ``/queue/status``,
``/models``, ``/v1/chat/completions``, ``/sdapi/v1/txt2img``), which stay protected as before.
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from . import middleware

STATIC = Path(__file__).parent / "static"

# Exact paths, so that nothing else under /dashboard/ becomes public by accident.
FILES = {
    "/dashboard": ("dashboard.html", "text/html"),
    "/dashboard/app.js": ("app.js", "text/javascript"),
    "/dashboard/style.css": ("style.css", "text/css"),
}

# The page loads only its own script and stylesheet and talks only to this router; images arrive as
# data: URLs from txt2img.
HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _handler(filename: str, content_type: str):
    path = STATIC / filename

    async def serve(request: web.Request) -> web.Response:
        try:
            body = path.read_bytes()
        except FileNotFoundError:
            raise web.HTTPNotFound() from None
        return web.Response(body=body, content_type=content_type, charset="utf-8", headers=HEADERS)

    return serve


async def _slash(request: web.Request) -> web.Response:
    raise web.HTTPPermanentRedirect("/dashboard")


def setup(app: web.Application) -> None:
    for route, (filename, content_type) in FILES.items():
        app.router.add_get(route, _handler(filename, content_type))
    app.router.add_get("/dashboard/", _slash)
    middleware.PUBLIC_PATHS.update(FILES)
    middleware.PUBLIC_PATHS.add("/dashboard/")
