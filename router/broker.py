"""Owns the router's ZeroMQ ROUTER socket: feeds frames to the scheduler, sends its frames, runs timers."""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from .scheduler import Scheduler

log = logging.getLogger("velesio.router")

RECV_BATCH = 256  # frames read in one go before the event loop gets a turn
COPY_THRESHOLD = 65536  # frames smaller than this are copied into ZeroMQ (cheaper than tracking them)


class Broker:
    def __init__(self, bind: str, *, curve=None):
        self.bind = bind
        self.curve = curve  # router/curve.py settings, or None for plain TCP
        self.ctx = zmq.asyncio.Context()
        self.socket: zmq.asyncio.Socket | None = None
        self.scheduler: Scheduler | None = None
        self._tasks: list[asyncio.Task] = []
        self._raw: zmq.Socket | None = None  # the same socket without asyncio's Futures
        self._pending_sends = 0

    def send(self, identity: bytes, frame: bytes) -> None:
        if self.socket is None:
            return
        if not self._pending_sends:
            # The common case: ZeroMQ takes the frame at once. The plain (non-asyncio) view of the socket
            # saves the Future the asyncio socket makes for every send.
            try:
                self._raw.send_multipart([identity, frame], zmq.NOBLOCK, copy=len(frame) < COPY_THRESHOLD)
                return
            except zmq.Again:
                pass  # the pipe is full: queue behind it, in order, through the asyncio socket
            except zmq.ZMQError as exc:
                log.debug("send to %r failed: %s", identity[:32], exc)
                return
        try:
            fut = self.socket.send_multipart([identity, frame], copy=False)
        except zmq.ZMQError as exc:
            log.debug("send to %r failed: %s", identity[:32], exc)
            return
        if not fut.done():
            self._pending_sends += 1
            fut.add_done_callback(self._sent)

    def _sent(self, fut: asyncio.Future) -> None:
        self._pending_sends -= 1
        if not fut.cancelled():
            fut.exception()  # retrieved, so that a failed send is not logged as never retrieved

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a worker reconnecting with its identity takes over
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        if self.curve is not None:
            self.curve.apply_server(sock, self.ctx)
        else:
            log.warning("mesh link %s is plain TCP: unencrypted and unauthenticated, "
                        "for a single trusted host only (see docs/security.md)", self.bind)
        sock.bind(self.bind)
        self.socket = sock
        self._raw = zmq.Socket.shadow(sock.underlying)
        log.info("mesh: ROUTER bound on %s", self.bind)
        self._tasks = [asyncio.create_task(self._receive(), name="mesh-receive"),
                       asyncio.create_task(self._timers(), name="mesh-timers")]

    async def _receive(self) -> None:
        assert self.socket is not None and self._raw is not None
        raw = self._raw
        while True:
            self._process(await self.socket.recv_multipart())
            # Whatever else has arrived is read without a Future and a loop turn per message (streams
            # bring thousands of PARTIALs a second); bounded, so HTTP handlers get their turn.
            for _ in range(RECV_BATCH):
                try:
                    frames = raw.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._process(frames)

    def _process(self, frames: list[bytes]) -> None:
        assert self.scheduler is not None
        if len(frames) != 2:
            log.warning("dropping a message of %d frames", len(frames))
            return
        try:
            self.scheduler.process_worker(frames[0], frames[1])
        except Exception:  # never let one bad message stop the mesh
            log.exception("error while processing a worker message")

    async def _timers(self) -> None:
        assert self.scheduler is not None
        interval = self.scheduler.heartbeat_ms / 1000
        next_beat = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval / 4)
            try:
                self.scheduler.tick()
                if loop.time() >= next_beat:
                    self.scheduler.heartbeat()
                    next_beat = loop.time() + interval
            except Exception:
                log.exception("error in mesh timers")

    async def stop(self) -> None:
        if self.scheduler is not None:
            self.scheduler.shutdown()
            await asyncio.sleep(0.05)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None
            self._raw = None
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()
