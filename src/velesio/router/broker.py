"""Owns the router's ZeroMQ ROUTER socket: feeds frames to the scheduler, sends its frames, runs timers."""

from __future__ import annotations

import asyncio
import logging

import zmq
import zmq.asyncio

from velesio.mesh.codec import COPY_THRESHOLD
from velesio.mesh.reader import SocketReader

from .scheduler import Scheduler

log = logging.getLogger("velesio.router")

# Plain ints: pyzmq's flag enums cost an enum construction per ``&``.
_NOBLOCK, _RCVMORE, _SNDMORE_NOBLOCK = int(zmq.NOBLOCK), int(zmq.RCVMORE), int(zmq.SNDMORE | zmq.NOBLOCK)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class Broker:
    """The ROUTER socket is a plain (non-asyncio) ZeroMQ socket read from the event loop (mesh/reader.py);
    the frames queued in a loop turn are sent back to back, and a send, which may consume the descriptor's
    edge of frames that arrived meanwhile, is followed by a look at ZMQ_EVENTS."""

    def __init__(self, bind: str, *, curve=None):
        self.bind = bind
        self.curve = curve  # mesh/curve.py CurveServer, or None for plain TCP
        self.ctx = zmq.asyncio.Context()
        self.socket: zmq.Socket | None = None
        self.scheduler: Scheduler | None = None
        self._tasks: list[asyncio.Task] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: SocketReader | None = None
        self._outbox: list[tuple[bytes, bytes]] = []
        self._flush_scheduled = False

    def send(self, identity: bytes, frame: bytes) -> None:
        """Queue a frame for a worker; it is sent with the others queued in this loop turn (``_flush``)."""
        if self.socket is None or self._loop is None:
            return
        self._outbox.append((identity, frame))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        """Send every queued frame back to back. A send to an idle ZeroMQ I/O thread wakes it (about 15 µs);
        frames that follow at once find it awake, so a burst of jobs costs one wake-up, not one each."""
        self._flush_scheduled = False
        sock = self.socket
        outbox, self._outbox = self._outbox, []
        if sock is None:
            return
        for identity, frame in outbox:
            try:
                # A ROUTER socket never blocks: at the high-water mark or for an unknown peer it drops the frame.
                sock.send(identity, _SNDMORE_NOBLOCK)
                sock.send(frame, _NOBLOCK, copy=len(frame) < COPY_THRESHOLD)
            except zmq.ZMQError as exc:
                log.debug("send to %r failed: %s", identity[:32], exc)
        # pyzmq types every option's value as int | bytes; ZMQ_EVENTS's is an int.
        if sock.get(_EVENTS) & _POLLIN and self._reader is not None:  # type: ignore[operator]
            self._reader.schedule()

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        sock = zmq.Socket(self.ctx, zmq.ROUTER)
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
        self._loop = asyncio.get_running_loop()
        self._reader = SocketReader(self._loop, self._read_one)
        self._reader.watch(sock.fileno())
        log.info("mesh: ROUTER bound on %s", self.bind)
        self._tasks = [asyncio.create_task(self._timers(), name="mesh-timers")]

    def _read_one(self) -> bool:
        sock = self.socket
        if sock is None:
            return False
        try:
            # [identity, frame] read part by part: recv_multipart's option lookups cost more than the reads
            frames = [sock.recv(_NOBLOCK)]
            frames.append(sock.recv(_NOBLOCK))
            while sock.get(_RCVMORE):
                frames.append(sock.recv(_NOBLOCK))
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:
            log.warning("mesh receive failed: %s", exc)
            return False
        self._process(frames)
        return True

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
        if self._reader is not None:
            self._reader.unwatch()
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None
        if self.curve is not None:
            self.curve.stop()
        self.ctx.term()
