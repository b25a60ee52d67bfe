"""The floors: what the client, aiohttp and ZeroMQ cost by themselves, with none of the mesh's own code.

- ``http``: a bare aiohttp server that answers POST /completion with a fixed body of the router's size,
  in one process like the router.
- ``zmq``: the same server, but each request goes to a separate echo process over a ZeroMQ ROUTER →
  DEALER link and the answer comes back the same way before the reply is written: the HTTP → ZeroMQ →
  worker → back path with no router logic, no scheduler and no backend.

``python -m bench.floor http PORT BODY_BYTES`` / ``python -m bench.floor zmq PORT BODY_BYTES MESH_ADDRESS``
(which starts its echo process, ``python -m bench.floor echo MESH_ADDRESS PARENT_PID``, itself, and the echo
dies with it, however it ends). Both run on the event loop the router runs on (velesio/loop.py)."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys

import zmq
from aiohttp import web

from velesio import loop as event_loop

from .cluster import die_with_parent


def reply_body(size: int) -> bytes:
    filler = "x" * max(0, size - 40)
    return json.dumps({"content": "ok", "stop": True, "filler": filler}).encode()


def http_app(size: int) -> web.Application:
    body = reply_body(size)

    async def completion(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/completion", completion)
    return app


def zmq_app(size: int, mesh: str) -> web.Application:
    """Each request: its body and a number to a DEALER echo over a ROUTER, answered when it comes back."""
    body = reply_body(size)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(mesh)
    waiting: dict[bytes, asyncio.Future] = {}
    peers: list[bytes] = []
    numbers = itertools.count()

    def read() -> None:
        while True:
            try:
                peer = sock.recv(zmq.NOBLOCK)
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frame == b"hello":
                peers.append(peer)
                continue
            fut = waiting.pop(frame[:8], None)
            if fut is not None and not fut.done():
                fut.set_result(frame[8:])

    async def completion(request: web.Request) -> web.Response:
        raw = await request.read()
        json.loads(raw)
        key = next(numbers).to_bytes(8, "little")
        fut = asyncio.get_running_loop().create_future()
        waiting[key] = fut
        sock.send_multipart([peers[0], key + raw], zmq.NOBLOCK)
        if sock.get(zmq.EVENTS) & zmq.POLLIN:
            asyncio.get_running_loop().call_soon(read)
        await fut
        return web.Response(body=body, content_type="application/json")

    async def start(app: web.Application):
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.getsockopt(zmq.FD), read)
        echo = subprocess.Popen([sys.executable, "-m", "bench.floor", "echo", mesh, str(os.getpid())])
        while not peers:
            await asyncio.sleep(0.05)
            read()
        yield
        echo.kill()
        sock.close(0)

    app = web.Application()
    app.router.add_post("/completion", completion)
    app.cleanup_ctx.append(start)
    return app


def echo(mesh: str, parent: int) -> int:
    """The floor's worker: a DEALER that sends back every frame it gets, at once. It dies with the floor
    process that started it: a floor is stopped by a signal, which runs none of its cleanup."""
    die_with_parent(parent)
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(mesh)
    sock.send(b"hello")
    while True:
        sock.send(sock.recv())


async def serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()  # until killed


def main(argv: list[str]) -> int:
    mode = argv[0]
    if mode == "echo":
        return echo(argv[1], int(argv[2]))
    port, size = int(argv[1]), int(argv[2])
    app = http_app(size) if mode == "http" else zmq_app(size, argv[3])
    event_loop.run(serve(app, port))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
