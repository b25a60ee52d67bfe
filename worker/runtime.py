"""The worker's side of the mesh: one DEALER per router, heartbeats, reconnects, and jobs run in threads."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import threading
import time
import uuid
from typing import Any

import zmq

from velesio.backends import BackendError, JobContext
from velesio.mesh import codec, protocol
from velesio.mesh.codec import COPY_THRESHOLD
from velesio.mesh.jobs import Job
from velesio.mesh.protocol import Command
from velesio.mesh.reader import SocketReader

from .jobthreads import JobThreads
from .models import LoadedModel, device_info
from .partials import PartialBatch

log = logging.getLogger("velesio.worker")

_NOBLOCK, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)


class Worker:
    """Serves loaded models to one or more routers."""

    def __init__(self, models: list[LoadedModel], failures: list[dict[str, str]], *, name: str | None = None,
                 heartbeat_ms: int = protocol.HEARTBEAT_MS, liveness: int = protocol.LIVENESS,
                 drain_s: float = 30.0, partial_window_ms: float = protocol.PARTIAL_WINDOW_MS, curve=None):
        self.models = {m.config.name: m for m in models}
        self.failures = failures
        self.name = name or socket.gethostname()
        self.heartbeat_ms = heartbeat_ms
        self.liveness = liveness
        self.drain_s = drain_s
        self.partial_window_s = max(0.0, float(partial_window_ms)) / 1000
        self.curve = curve
        self.ctx = zmq.Context()
        self.threads = JobThreads("job")
        self.running: dict[tuple[str, int], tuple[JobContext, "RouterLink"]] = {}
        self.lock = threading.Lock()  # slots and ``running``: taken on the event loop, given back by job threads
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
        with self.lock:
            still = list(self.running.values())
        for ctx, _link in still:
            ctx.cancel()
        for link in links:
            link.send(Command.DISCONNECT, {"reason": protocol.REASON_LEAVING})
        await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in links:
            link.close()
        self.threads.shutdown()
        self.ctx.term()

    # ---- jobs --------------------------------------------------------------------------------
    def start_job(self, link: "RouterLink", body: dict[str, Any]) -> None:
        """A REQUEST (on the event loop): take a slot and hand the job to a thread of the pool."""
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
        key = (job.id, job.attempt)
        window_s = self.partial_window_s if link.router_minor >= protocol.PARTIAL_CHUNKS_MINOR else 0.0
        partials = PartialBatch(link, job.id, job.attempt, window_s, asyncio.get_running_loop())

        def emit(chunk: dict[str, Any]) -> None:
            ctx.progress_n += 1  # reported in heartbeats: the router's proof that the job is not stuck
            if job.stream or "step" in chunk:
                partials.add(chunk)

        ctx = JobContext(job, emit)
        with self.lock:
            if model.free <= 0 or self.draining:
                busy = True
            else:
                busy = False
                model.busy += 1
                self.running[key] = (ctx, link)
        if busy:
            link.send(Command.ERROR, {"job": job.id, "attempt": job.attempt, "code": "busy", "message": "busy"})
            return
        log.debug("job %s attempt %d: %s on %s", job.id, job.attempt, job.op, job.model)
        self.threads.submit(self._run_job, key, model, link, job, ctx, partials)

    def _run_job(self, key: tuple[str, int], model: LoadedModel, link: "RouterLink", job: Job,
                 ctx: JobContext, partials: PartialBatch) -> None:
        """In a job thread: run the backend, free the slot, send the pieces still waiting and then the one
        FINAL or ERROR from here (the event loop is not woken for it)."""
        try:
            result, exc = model.backend.run(job, ctx), None
        except BaseException as err:  # noqa: BLE001 - every failure becomes the job's one ERROR
            result, exc = None, err
        partials.flush()
        # The slot is free before the router hears of the end: it may send the next job at once.
        with self.lock:
            model.busy -= 1
            self.running.pop(key, None)
            self.jobs_done += 1
        base = {"job": job.id, "attempt": job.attempt}
        if exc is None:
            log.info("job %s attempt %d on %s: ok", job.id, job.attempt, model.config.name, extra={"job": job.id})
            try:
                link.send(Command.FINAL, {**base, "result": result})
                return
            except (TypeError, ValueError) as err:  # a result msgpack cannot carry (a backend bug)
                log.error("job %s: result of %s cannot be sent: %s", job.id, model.config.backend, err)
                link.send(Command.ERROR, {**base, "code": "internal_error",
                                          "message": f"backend {model.config.backend} returned an unsendable result"})
        elif isinstance(exc, BackendError):
            log.info("job %s attempt %d on %s: %s", job.id, job.attempt, model.config.name, exc.code,
                     extra={"job": job.id})
            link.send(Command.ERROR, {**base, "code": exc.code, "message": str(exc) or exc.code})
        else:
            log.error("job %s failed: %s: %s", job.id, type(exc).__name__, exc, exc_info=exc)
            link.send(Command.ERROR, {**base, "code": "internal_error",
                                      "message": f"the backend failed: {type(exc).__name__}: {exc}"})

    def cancel_job(self, body: dict[str, Any]) -> None:
        entry = self.running.get((str(body.get("job")), body.get("attempt")))
        if entry is not None:
            entry[0].cancel(keep_partial=bool(body.get("keep")))


class RouterLink:
    """One DEALER connection to one router, with Paranoid-Pirate style liveness and reconnects.

    The DEALER is a plain ZeroMQ socket shared by the event loop and the job threads under one lock: the
    loop reads it (mesh/reader.py, as the router's broker does) and sends READY and HEARTBEAT; job threads
    send their PARTIALs and their FINAL themselves, so a result costs no wake-up of the loop. Any use of the
    socket may consume its descriptor's edge, so a send that finds frames waiting schedules a read."""

    def __init__(self, worker: Worker, address: str):
        self.worker = worker
        self.address = address
        self.sock: zmq.Socket | None = None
        self.welcomed = False
        self.last_heard = 0.0
        self.seen_seq = 0  # highest REQUEST sequence number received on this connection
        self.router_minor = 0  # from WELCOME: what the router reads (protocol.PARTIAL_CHUNKS_MINOR)
        self._lock = threading.Lock()  # a ZeroMQ socket is not thread-safe; every use holds this
        self._loop_thread: int | None = None
        self._reader: SocketReader | None = None

    def send(self, command: Command, body: dict[str, Any] | None = None) -> None:
        """Send now, from the event loop or a job thread. Raises TypeError/ValueError for a body msgpack
        cannot carry."""
        frame = codec.encode(command, body)
        with self._lock:
            sock = self.sock
            if sock is None:
                return
            try:
                # Never blocks: a DEALER queues for its router, and drops only at the high-water mark.
                sock.send(frame, _NOBLOCK, copy=len(frame) < COPY_THRESHOLD)
            except zmq.ZMQError as exc:
                log.debug("send to %s failed: %s", self.address, exc)
                return
            waiting = sock.get(_EVENTS) & _POLLIN
        if waiting:
            self._wake_reader()

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is None:
            return
        if threading.get_ident() == self._loop_thread:
            reader.schedule()
        else:
            try:
                reader.loop.call_soon_threadsafe(reader.schedule)
            except RuntimeError:  # the loop is closed: the worker is stopping
                pass

    def _read_one(self) -> bool:
        with self._lock:
            sock = self.sock
            if sock is None:
                return False
            try:
                frame = sock.recv(_NOBLOCK)
            except zmq.Again:
                return False
            except zmq.ZMQError as exc:
                log.warning("mesh receive from %s failed: %s", self.address, exc)
                return False
        try:
            command, body = codec.decode(frame)
        except codec.DecodeError as exc:
            log.warning("bad frame from router %s: %s", self.address, exc)
            return True
        self.last_heard = time.monotonic()
        try:
            self.process(command, body)
        except Exception:  # never let one bad message stop the link
            log.exception("error while processing a %s from router %s", command.name, self.address)
        return True

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
        with self._lock:
            self.sock = sock
        self.welcomed = False
        self.last_heard = time.monotonic()
        self.greet()
        self._reader.watch(sock.getsockopt(zmq.FD))

    def _jobs(self) -> dict[str, JobContext]:
        """The jobs this router gave us that are still running, by job id."""
        with self.worker.lock:
            running = list(self.worker.running.items())
        return {job_id: ctx for (job_id, _), (ctx, link) in running if link is self}

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
        if self._reader is not None:
            self._reader.unwatch()
        with self._lock:
            sock, self.sock = self.sock, None
        if sock is not None:
            sock.close(0)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, then every heartbeat interval: beat (or greet until welcomed) and check the router is
        alive; reconnect with backoff when it is silent too long. Frames are read by ``_read_one``."""
        self._loop_thread = threading.get_ident()
        self._reader = SocketReader(asyncio.get_running_loop(), self._read_one)
        interval = self.worker.heartbeat_ms / 1000
        backoff = protocol.RECONNECT_MIN_S
        self._connect()
        log.info("connecting to router %s as %s", self.address, self.worker.name)
        try:
            while True:
                await asyncio.sleep(interval)
                now = time.monotonic()
                if now - self.last_heard > interval * self.worker.liveness:
                    log.warning("router %s silent for %.1fs; reconnecting in %.2fs", self.address,
                                now - self.last_heard, backoff)
                    self.close()
                    await asyncio.sleep(backoff + random.uniform(0, backoff / 4))
                    backoff = min(backoff * 2, protocol.RECONNECT_MAX_S)
                    self._connect()
                    continue
                if now - self.last_heard < interval:
                    backoff = protocol.RECONNECT_MIN_S
                if self.welcomed:
                    self.heartbeat()
                else:
                    self.greet()
        finally:
            self.close()

    def process(self, command: Command, body: dict[str, Any]) -> None:
        if command == Command.WELCOME:
            if not self.welcomed:
                log.info("registered with router %s", self.address)
            self.welcomed = True
            self.router_minor = protocol.minor(body.get("version"))
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
            elif reason == protocol.REASON_VERSION:
                log.error("router %s refused this worker: %s", self.address, body.get("message"))
                self.last_heard = 0.0  # reconnect with backoff at the next beat, until an operator upgrades
            else:
                log.warning("router %s disconnected: %s", self.address, reason)
                self.last_heard = 0.0  # reconnect with backoff at the next beat
        elif command != Command.HEARTBEAT:
            log.warning("unexpected %s from router %s", command.name, self.address)
