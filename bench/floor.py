"""The HTTP floor: a bare aiohttp server that answers POST /completion with a fixed body of the router's
size, in one process like the router. What the client and aiohttp cost by themselves, with no mesh behind.

``python -m bench.floor PORT BODY_BYTES [asyncio|uvloop]``"""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web


def make_app(size: int) -> web.Application:
    filler = "x" * max(0, size - 40)
    body = json.dumps({"content": "ok", "stop": True, "filler": filler}).encode()

    async def completion(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/completion", completion)
    return app


def main(argv: list[str]) -> int:
    port, size = int(argv[0]), int(argv[1])
    if len(argv) > 2 and argv[2] == "uvloop":
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    web.run_app(make_app(size), host="127.0.0.1", port=port, access_log=None, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
