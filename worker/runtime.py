"""The worker's side of the mesh: one DEALER per router, heartbeats, reconnects, and jobs run in threads."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import random
import socket
import time
import uuid
from typing import Any

import zmq
import zmq.asyncio

from velesio.backends import BackendError, Cancelled, JobContext
from velesio.mesh import codec, protocol
from velesio.mesh.codec import COPY_THRESHOLD
from velesio.mesh.jobs import Job
from velesio.mesh.protocol import Command

from .models import LoadedModel, device_info

log = logging.getLogger("velesio.worker")

class Worker:
    """Serves loaded models to one or more routers."""

    def __init__(self, models: list[LoadedModel], failures: list[dict[str, str]], *, name: str | None = None,
                 heartbeat_ms: int = protocol.HEARTBEAT_MS, liveness: int = protocol.LIVENESS,
                 drain_s: float = 30.0, curve=None):
        self.models = {m.config.name: m for m in models}
        self.failures = failures
        self.name = name or socket.gethostname()
        self.heartbeat_ms = heartbeat_ms
        self.liveness = liveness
        self.drain_s = drain_s
        self.curve = curve
        self.ctx = zmq.asyncio.Context()
        slots = sum(m.config.slots for m in models) or 1
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=slots + 2, thread_name_prefix="job")
        self.running: dict[tuple[str, int], tuple[JobContext, "RouterLink"]] = {}
        self.draining = False
        self.jobs_done = 0
        self.device = device_info()

    def __repr__(self) -> str:
        return f"<Worker {self.name} models={list(self.models)} running={len(self.running)} done={self.jobs_done}>"

    def refresh_memory(self) -> None:
        self.device.update({k: v for k, v in device_info().items() if k.startswith("memory")})

    def capabilities(self) -> dict[str, Any]:
        self.refresh_memory()
        return {"host": socket.gethostname(), "pid": os.getpid(), **self.device,
                "models": [m.advert() for m in self.models.values()], "failures": self.failures}

    def load(self) -> dict[str, int]:
        return {name: m.free for name, m in self.models.items()}

    async def serve(self, routers: list[str], stop: asyncio.Event) -> None:
        links = [RouterLink(self, address) for address in routers]
        tasks = [asyncio.create_task(link.run(stop)) for link in links]
        await stop.wait()
        # Drain: stop taking jobs, let running ones finish (bounded), then say goodbye.
        self.draining = True
        for link in links:
            link.heartbeat()
        deadline = time.monotonic() + self.drain_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for ctx, _link in list(self.running.values()):
            ctx.cancel()
        for link in links:
            link.send(Command.DISCONNECT, {"reason": protocol.REASON_LEAVING})
        await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in links:
            link.close()
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.ctx.term()

    # ---- jobs --------------------------------------------------------------------------------
    def start_job(self, link: "RouterLink", body: dict[str, Any]) -> None:
        if isinstance(body.get("seq"), int):
            link.seen_seq = max(link.seen_seq, body["seq"])  # echoed in heartbeats
        try:
            job = Job.from_wire(body)
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("bad REQUEST from %s: %s", link.address, exc)
            return
        model = self.models.get(job.model)
        if model is None or job.op not in model.operations:
            link.send(Command.ERROR, {"job": job.id, "attempt": job.attempt, "code": "model_not_found",
                                      "message": f"this worker does not serve {job.op} on '{job.model}'"})
            return
        if model.free <= 0 or self.draining:
            link.send(Command.ERROR, {"job": job.id, "attempt": job.attempt, "code": "busy", "message": "busy"})
            return
        model.busy += 1
        loop = asyncio.get_running_loop()
        key = (job.id, job.attempt)

        def emit(chunk: dict[str, Any]) -> None:
            ctx.progress_n += 1  # reported in heartbeats: the router's proof that the job is not stuck
            if job.stream or "step" in chunk:
                link.post(loop, Command.PARTIAL, {"job": job.id, "attempt": job.attempt, "chunk": chunk})

        ctx = JobContext(job, emit)
        self.running[key] = (ctx, link)
        log.debug("job %s attempt %d: %s on %s", job.id, job.attempt, job.op, job.model)
        future = loop.run_in_executor(self.executor, model.backend.run, job, ctx)
        future.add_done_callback(lambda f: self._end_job(key, model, link, f))

    def _end_job(self, key: tuple[str, int], model: LoadedModel, link: "RouterLink", future) -> None:
        model.busy -= 1
        self.running.pop(key, None)
        self.jobs_done += 1
        job_id, attempt = key
        base = {"job": job_id, "attempt": attempt}
        exc = future.exception() if not future.cancelled() else Cancelled("cancelled")
        log.info("job %s attempt %d on %s: %s", job_id, attempt, model.config.name,
                 "ok" if exc is None else getattr(exc, "code", type(exc).__name__), extra={"job": job_id})
        if exc is None:
            try:
                link.send(Command.FINAL, {**base, "result": future.result()})
            except (TypeError, ValueError) as err:  # a result msgpack cannot carry (a backend bug)
                log.error("job %s: result of %s cannot be sent: %s", job_id, model.config.backend, err)
                link.send(Command.ERROR, {**base, "code": "internal_error",
                                          "message": f"backend {model.config.backend} returned an unsendable result"})
        elif isinstance(exc, BackendError):
            link.send(Command.ERROR, {**base, "code": exc.code, "message": str(exc) or exc.code})
        else:
            log.error("job %s failed: %s: %s", job_id, type(exc).__name__, exc, exc_info=exc)
            link.send(Command.ERROR, {**base, "code": "internal_error",
                                      "message": f"the backend failed: {type(exc).__name__}: {exc}"})

    def cancel_job(self, body: dict[str, Any]) -> None:
        entry = self.running.get((str(body.get("job")), body.get("attempt")))
        if entry is not None:
            entry[0].cancel(keep_partial=bool(body.get("keep")))


class RouterLink:
    """One DEALER connection to one router, with Paranoid-Pirate style liveness and reconnects."""

    def __init__(self, worker: Worker, address: str):
        self.worker = worker
        self.address = address
        self.sock: zmq.asyncio.Socket | None = None
        self.welcomed = False
        self.last_heard = 0.0
        self._outbox: collections.deque[tuple[Command, dict[str, Any]]] = collections.deque()
        self._flush_scheduled = False
        self.seen_seq = 0  # highest REQUEST sequence number received on this connection

    def send(self, command: Command, body: dict[str, Any] | None = None) -> None:
        """Send now (on the event loop). Messages posted earlier from job threads go first."""
        if self.sock is None:
            return
        if self._outbox:
            self._flush()
        self._send_frame(codec.encode(command, body))

    def post(self, loop: asyncio.AbstractEventLoop, command: Command, body: dict[str, Any]) -> None:
        """Send from a job's thread. Messages are queued and the event loop, woken once for all that arrive
        before it runs, sends them in order: a token stream costs one wake-up per batch, not per token."""
        self._outbox.append((command, body))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False  # before reading the queue: a message posted from now on schedules again
        outbox = self._outbox
        # Only what is queued now: job threads may post faster than this sends, and heartbeats and REQUESTs
        # must not wait behind an endless flush. The rest goes on the next loop turn.
        for _ in range(len(outbox)):
            command, body = outbox.popleft()
            if self.sock is None:
                continue
            try:
                frame = codec.encode(command, body)
            except (TypeError, ValueError) as exc:  # a chunk msgpack cannot carry (a backend bug)
                log.error("dropping a %s that cannot be encoded: %s", command.name, exc)
                continue
            self._send_frame(frame)
        if outbox and not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _send_frame(self, frame: bytes) -> None:
        if self.sock is None:
            return
        try:
            fut = self.sock.send(frame, copy=len(frame) < COPY_THRESHOLD)
        except zmq.ZMQError as exc:
            log.debug("send to %s failed: %s", self.address, exc)
            return
        if not fut.done():
            fut.add_done_callback(lambda f: f.exception())

    def _connect(self) -> None:
        self.close()
        sock = self.worker.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"{self.worker.name}-{uuid.uuid4().hex[:8]}".encode())
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        if self.worker.curve is not None:
            self.worker.curve.apply_client(sock)
        sock.connect(self.address)
        self.sock = sock
        self.welcomed = False
        self.last_heard = time.monotonic()
        self.greet()

    def _jobs(self) -> dict[str, JobContext]:
        """The jobs this router gave us that are still running, by job id."""
        return {job_id: ctx for (job_id, _), (ctx, link) in self.worker.running.items() if link is self}

    def greet(self) -> None:
        self.seen_seq = 0  # a router that registers us anew numbers its REQUESTs from 1
        running = {job_id: ctx.job.model for job_id, ctx in self._jobs().items()}
        self.send(Command.READY, {"version": protocol.VERSION, "worker": self.worker.name,
                                  "capabilities": self.worker.capabilities(), "running": running})

    def heartbeat(self) -> None:
        progress = {job_id: ctx.progress_n for job_id, ctx in self._jobs().items()}
        self.worker.refresh_memory()
        self.send(Command.HEARTBEAT, {"load": self.worker.load(), "jobs": list(progress), "progress": progress,
                                      "seen": self.seen_seq,
                                      "draining": self.worker.draining,
                                      "memory_free_mb": self.worker.device.get("memory_free_mb")})

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(0)
            self.sock = None

    async def run(self, stop: asyncio.Event) -> None:
        interval = self.worker.heartbeat_ms / 1000
        backoff = protocol.RECONNECT_MIN_S
        self._connect()
        log.info("connecting to router %s as %s", self.address, self.worker.name)
        next_beat = time.monotonic() + interval
        while True:
            timeout = max(0.0, next_beat - time.monotonic())
            events = await self.sock.poll(timeout * 1000, zmq.POLLIN)
            now = time.monotonic()
            if events:
                try:
                    command, body = codec.decode(await self.sock.recv())
                except codec.DecodeError as exc:
                    log.warning("bad frame from router %s: %s", self.address, exc)
                    continue
                self.last_heard = now
                backoff = protocol.RECONNECT_MIN_S
                if command == Command.DISCONNECT and body.get("reason") == protocol.REASON_VERSION:
                    log.error("router %s refused this worker: %s", self.address, body.get("message"))
                    await asyncio.sleep(protocol.RECONNECT_MAX_S)
                    self._connect()
                    continue
                self.process(command, body)
            if now >= next_beat:
                next_beat = now + interval
                if self.welcomed:
                    self.heartbeat()
                else:
                    self.greet()
                if now - self.last_heard > interval * self.worker.liveness:
                    log.warning("router %s silent for %.1fs; reconnecting in %.2fs", self.address,
                                now - self.last_heard, backoff)
                    self.close()
                    await asyncio.sleep(backoff + random.uniform(0, backoff / 4))
                    backoff = min(backoff * 2, protocol.RECONNECT_MAX_S)
                    self._connect()

    def process(self, command: Command, body: dict[str, Any]) -> None:
        if command == Command.WELCOME:
            if not self.welcomed:
                log.info("registered with router %s", self.address)
            self.welcomed = True
        elif command == Command.REQUEST:
            self.worker.start_job(self, body)
        elif command == Command.CANCEL:
            self.worker.cancel_job(body)
        elif command == Command.DISCONNECT:
            reason = body.get("reason")
            if reason == protocol.REASON_UNKNOWN:
                log.info("router %s does not know this worker (restarted?); announcing again", self.address)
                self.welcomed = False
                self.greet()
            else:
                log.warning("router %s disconnected: %s", self.address, reason)
                self.last_heard = 0.0  # reconnect with backoff at the next beat
        elif command != Command.HEARTBEAT:
            log.warning("unexpected %s from router %s", command.name, self.address)
