"""The worker's side of the mesh: one DEALER per router, heartbeats, reconnects, and jobs handed to the
backend processes it supervises."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Mapping
from typing import Any

import zmq

import velesio
from velesio.backends import Backend
from velesio.mesh import codec, messages, protocol
from velesio.mesh.codec import COPY_THRESHOLD
from velesio.mesh.jobs import Job
from velesio.mesh.protocol import Command
from velesio.mesh.reader import SocketReader

from . import cpu
from .admin import ModelAdmin
from .models import LoadedModel, device_info
from .supervisor import BackendProcess, RunningJob

log = logging.getLogger("velesio.worker")

_NOBLOCK, _EVENTS, _POLLIN = int(zmq.NOBLOCK), int(zmq.EVENTS), int(zmq.POLLIN)
WATCH_EVERY_S = 0.1  # the backend processes' watchdog period
RESHARE_EVERY_S = 2.0  # how often the worker looks for workers that joined or left its host
UNLOADED_S = 10.0  # how long a REQUEST for a model just unloaded is answered busy rather than model_not_found


class Worker:
    """Serves models to one or more routers; each model's backend runs in a process this worker supervises
    (worker/supervisor.py), so nothing a job does to a backend ends the worker or its mesh links."""

    def __init__(self, *, name: str | None = None, heartbeat_ms: int = protocol.HEARTBEAT_MS,
                 liveness: int = protocol.LIVENESS, drain_s: float = 30.0,
                 partial_window_ms: float = protocol.PARTIAL_WINDOW_MS, curve: Any = None,
                 registry: cpu.HostRegistry | None = None, memory_budget_mb: int | None = None,
                 cancel_grace_s: float = 10.0, log_level: str = "INFO", log_json: bool = False):
        self.models: dict[str, LoadedModel] = {}
        self.loading: dict[str, LoadedModel] = {}  # models an operator's LOAD is starting (worker/admin.py)
        self.failures: list[dict[str, str]] = []
        self.backend_classes: dict[str, type[Backend]] = {}  # the installed backends: what a LOAD may start
        self.memory_budget_mb = memory_budget_mb
        self.cancel_grace_s = cancel_grace_s
        self.log_level, self.log_json = log_level, log_json
        self.admin = ModelAdmin(self)
        self.unloaded: dict[str, float] = {}  # model -> when an UNLOAD removed it (a REQUEST racing it is busy)
        self.name = name or socket.gethostname()
        self.heartbeat_ms = heartbeat_ms
        self.liveness = liveness
        self.drain_s = drain_s
        self.partial_window_s = max(0.0, float(partial_window_ms)) / 1000
        self.curve = curve
        self.ctx = zmq.Context()
        self.running: dict[tuple[str, int], RunningJob] = {}
        self.links: list[RouterLink] = []
        self.draining = False
        self.jobs_done = 0
        self.device = device_info()
        self.registry = registry  # the workers of this host, who share its cores (worker/cpu.py)
        self.threads = self.cpu_share()

    def __repr__(self) -> str:
        return f"<Worker {self.name} models={list(self.models)} running={len(self.running)} done={self.jobs_done}>"

    def serve_models(self, models: list[LoadedModel], failures: list[dict[str, str]],
                     backends: dict[str, type[Backend]] | None = None) -> None:
        self.models = {m.config.name: m for m in models}
        self.failures = failures
        self.backend_classes = dict(backends or {})

    def processes(self) -> list[BackendProcess]:
        """Every backend process this worker holds: its models', those still finishing their jobs after a
        slot change, and those loading."""
        return [*(m.process for m in self.models.values()), *(p for m in self.models.values() for p in m.retired),
                *(m.process for m in self.loading.values()), *self.admin.starting]

    def cpu_share(self) -> int:
        """The CPU threads this worker's backends may use: its share of the cores it may run on."""
        workers = self.registry.peers() if self.registry is not None else 1
        return cpu.thread_share(cpu.available_cores(), workers)

    def reshare_threads(self) -> None:
        """Another worker joined or left the host: give the backend processes the new share."""
        threads = self.cpu_share()
        if threads != self.threads:
            log.info("CPU threads per backend: %d -> %d (workers on this host changed)", self.threads, threads)
            self.threads = threads
            for process in self.processes():
                process.set_threads(threads)

    def refresh_memory(self) -> None:
        self.device.update({k: v for k, v in device_info().items() if k.startswith("memory")})

    def capabilities(self) -> dict[str, Any]:
        self.refresh_memory()
        return {"host": socket.gethostname(), "pid": os.getpid(), **self.device,
                "models": [m.advert() for m in self.models.values()], "failures": self.failures,
                "backends": self.backends(), "memory_budget_mb": self.memory_budget_mb}

    def load(self) -> dict[str, int]:
        return {name: m.free for name, m in self.models.items()}

    def backends(self) -> dict[str, messages.BackendStatus]:
        """Each model's backend process: state, crashes and restarts (heartbeats, the router's /health), and
        the models being loaded."""
        now = time.monotonic()
        return {name: m.status(now) for name, m in (*self.loading.items(), *self.models.items())}

    def beat(self) -> None:
        """A model's state changed: tell every router now, not at the next beat."""
        for link in self.links:
            if link.welcomed:
                link.heartbeat()

    def announce(self) -> None:
        """The models served changed: every router replaces its list of this worker's models (a new READY)."""
        for link in self.links:
            if link.welcomed:
                link.announce()

    async def serve(self, routers: list[str], stop: asyncio.Event) -> None:
        self.links = [RouterLink(self, address, i) for i, address in enumerate(routers)]
        tasks = [asyncio.create_task(link.run(stop)) for link in self.links]
        tasks.append(asyncio.create_task(self._watch()))
        await stop.wait()
        # Drain: stop taking jobs, let running ones finish (bounded), then say goodbye.
        self.draining = True
        for link in self.links:
            link.heartbeat()
        deadline = time.monotonic() + self.drain_s
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for rj in list(self.running.values()):
            self.stop_job(rj)
        for link in self.links:
            link.send(Command.DISCONNECT, messages.disconnect(protocol.REASON_LEAVING))
        await asyncio.sleep(0.1)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        starting = list(self.admin.starting)  # a change cut short leaves its new process to stop here
        await self.admin.close()
        await asyncio.gather(*(p.stop() for p in {*self.processes(), *starting}), return_exceptions=True)
        for link in self.links:
            link.close()
        self.ctx.term()

    async def _watch(self) -> None:
        """The backend processes' watchdog (memory ceilings, job durations, cancel grace), and the CPU share."""
        next_share = time.monotonic() + RESHARE_EVERY_S
        while True:
            await asyncio.sleep(WATCH_EVERY_S)
            now = time.monotonic()
            for model in self.models.values():
                model.process.watch(now)
                for old in list(model.retired):  # replaced by a process with more slots
                    old.watch(now)
                    if not old.jobs:
                        model.retired.remove(old)
                        self.admin.spawn(old.stop())
                for rj, _wire in model.pending:  # waiting for the model to load: not stuck
                    rj.progress_n += 1
            self.admin.idle_check(now)
            if now >= next_share:
                next_share = now + RESHARE_EVERY_S
                self.reshare_threads()

    # ---- jobs --------------------------------------------------------------------------------
    def start_job(self, link: RouterLink, body: dict[str, Any]) -> None:
        """A REQUEST: take the model's slot (every slot for an exclusive job) and hand the job to its
        backend process."""
        if isinstance(body.get("seq"), int):
            link.seen_seq = max(link.seen_seq, body["seq"])  # echoed in heartbeats
        try:
            job = Job.from_wire(body)
        except (KeyError, TypeError, ValueError) as exc:
            # An operation this version does not know (a newer router), or a malformed body: the job ends
            # here, with an answer whenever the body says which job it is.
            why = f"no {exc} field" if isinstance(exc, KeyError) else str(exc)
            log.warning("bad REQUEST from %s: %s", link.address, why)
            job_id, attempt = body.get("id"), body.get("attempt", 1)
            if isinstance(job_id, str) and isinstance(attempt, int) and not isinstance(attempt, bool):
                link.send(Command.ERROR, messages.error(
                    job_id, attempt, "invalid_request",
                    f"worker {self.name} (velesio {velesio.__version__}) cannot run this job: {why}"))
            return
        model = self.models.get(job.model)
        if model is None and time.monotonic() - self.unloaded.get(job.model, -UNLOADED_S) < UNLOADED_S:
            # Sent before its router heard of the unload: busy, and the router places it anew.
            link.send(Command.ERROR, messages.error(job.id, job.attempt, "busy", f"model {job.model} was unloaded"))
            return
        if model is None or job.op not in model.operations:
            link.send(Command.ERROR, messages.error(job.id, job.attempt, "model_not_found",
                                                    f"this worker does not serve {job.op} on '{job.model}'"))
            return
        slots = model.config.slots if job.exclusive else 1
        if self.draining or model.free < slots or (job.id, job.attempt) in self.running:
            link.send(Command.ERROR, messages.error(job.id, job.attempt, "busy", "busy"))
            return
        process = model.process
        rj = process.new_job(job.id, job.attempt, link, slots)
        model.busy += slots
        model.last_used = time.monotonic()
        self.running[(job.id, job.attempt)] = rj
        log.debug("job %s attempt %d: %s on %s", job.id, job.attempt, job.op, job.model)
        if model.phase in ("sleeping", "waking"):  # idle past its keep_alive: the job waits while it loads
            model.pending.append((rj, body))
            if model.phase == "sleeping":
                self.admin.spawn(self.admin.wake(model))
            return
        process.run(rj, body, self.partial_window_s)

    def stop_job(self, rj: RunningJob, keep: bool = False) -> None:
        """Stop a job: cancel it in its backend process, or end it now if it still waits for one."""
        if rj.process is not None:
            rj.process.cancel(rj, keep=keep)
        else:
            self.end_waiting(rj, "cancelled", "cancelled")

    def end_waiting(self, rj: RunningJob, code: str, message: str) -> None:
        """End a job that waits for its model to load (worker/admin.py ``wake``) with an ERROR."""
        model = self.models.get(rj.model)
        if model is not None:
            model.pending = [(r, wire) for r, wire in model.pending if r is not rj]
        self._job_ended(rj)
        if rj.link is not None:
            rj.link.send(Command.ERROR, messages.error(rj.job_id, rj.attempt, code, message))

    def hand_back(self, rj: RunningJob, why: str) -> None:
        """Give a job back to its router to run elsewhere (ERROR ``backend_restarted``: moved without blame)
        and stop it here; nothing more of it reaches the router."""
        link, rj.link = rj.link, None
        if rj.process is None:
            self.end_waiting(rj, "backend_restarted", why)
        else:
            self._job_ended(rj)
            rj.process.cancel(rj)
        if link is not None:
            link.send(Command.ERROR, messages.error(rj.job_id, rj.attempt, "backend_restarted", why))

    def _job_ended(self, rj: RunningJob) -> None:
        """Free the job's slots before its router hears of the end: it may send the next job at once. Other
        routers hear of the free slots at once too (several routers share this worker)."""
        if self.running.pop((rj.job_id, rj.attempt), None) is not None:
            model = self.models.get(rj.model)
            if model is not None:
                model.busy -= rj.slots
                model.last_used = time.monotonic()
            self.jobs_done += 1
            for link in self.links:
                if link is not rj.link and link.welcomed:
                    link.heartbeat()

    def backend_out(self, rj: RunningJob, frame: bytes) -> None:
        rj.progress_n += 1
        if rj.link is not None:
            rj.link.send_frame(frame)

    def backend_progress(self, rj: RunningJob, n: int) -> None:
        rj.progress_n = n

    def backend_end(self, rj: RunningJob, frame: bytes, outcome: str) -> None:
        self._job_ended(rj)
        log.info("job %s attempt %d on %s: %s", rj.job_id, rj.attempt, rj.model, outcome, extra={"job": rj.job_id})
        if rj.link is not None:
            rj.link.send_frame(frame)

    def backend_lost(self, rj: RunningJob, code: str, message: str, details: dict[str, Any]) -> None:
        self._job_ended(rj)
        log.warning("job %s attempt %d on %s: %s (%s)", rj.job_id, rj.attempt, rj.model, code, message,
                    extra={"job": rj.job_id})
        if rj.link is not None:
            rj.link.send(Command.ERROR, messages.error(rj.job_id, rj.attempt, code, message, details))

    def backend_state(self, process: BackendProcess) -> None:
        """A backend process went down or came back: tell every router now, not at the next beat."""
        self.beat()

    def cancel_job(self, link: RouterLink, body: dict[str, Any]) -> None:
        attempt = body.get("attempt")
        rj = self.running.get((str(body.get("job")), attempt if isinstance(attempt, int) else -1))
        if rj is not None:
            self.stop_job(rj, keep=bool(body.get("keep")))
        elif isinstance(attempt, int):
            # A job this worker does not run (its REQUEST was lost, or it has just ended): say it is over,
            # so that a router still counting its slot as taken frees it. A router that saw the end drops this.
            link.send(Command.ERROR, messages.error(str(body.get("job")), attempt, "cancelled", "cancelled"))


class RouterLink:
    """One DEALER connection to one router, with Paranoid-Pirate style liveness and reconnects.

    The DEALER is a plain ZeroMQ socket used only from the event loop: the loop reads it (mesh/reader.py,
    as the router's broker does), sends READY and HEARTBEAT, and forwards the frames of the backend
    processes. Any use of the socket may consume its descriptor's edge, so a send that finds frames
    waiting schedules a read."""

    def __init__(self, worker: Worker, address: str, index: int = 0):
        self.worker = worker
        self.address = address
        self.index = index  # its place in the worker's routers (which CurveZMQ key is its)
        self.sock: zmq.Socket | None = None
        self.welcomed = False
        self.last_heard = 0.0
        self.disconnected = False  # the router said DISCONNECT: reconnect at the next beat
        self.seen_seq = 0  # highest REQUEST sequence number received on this connection
        self._reader: SocketReader | None = None

    def send(self, command: Command, body: Mapping[str, Any] | None = None) -> None:
        """Send now. Raises TypeError/ValueError for a body msgpack cannot carry."""
        self.send_frame(codec.encode(command, body))

    def send_frame(self, frame: bytes) -> None:
        """Send a finished frame now (a backend process's PARTIAL, FINAL or ERROR, forwarded as it came)."""
        sock = self.sock
        if sock is None:
            return
        try:
            # Never blocks: a DEALER queues for its router, and drops only at the high-water mark.
            sock.send(frame, _NOBLOCK, copy=len(frame) < COPY_THRESHOLD)
        except zmq.ZMQError as exc:
            log.debug("send to %s failed: %s", self.address, exc)
            return
        # pyzmq types every option's value as int | bytes; ZMQ_EVENTS's is an int.
        if sock.get(_EVENTS) & _POLLIN and self._reader is not None:  # type: ignore[operator]
            self._reader.schedule()

    def _read_one(self) -> bool:
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

    def _connect(self, reader: SocketReader) -> None:
        self.close()
        sock = self.worker.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, f"{self.worker.name}-{uuid.uuid4().hex[:8]}".encode())
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        if self.worker.curve is not None:
            self.worker.curve.apply_client(sock, self.index)
        sock.connect(self.address)
        self.sock = sock
        self.welcomed = False
        self.last_heard = time.monotonic()
        self.greet()
        reader.watch(sock.fileno())

    def _jobs(self) -> list[RunningJob]:
        """The jobs this router gave us that are still running."""
        return [rj for rj in self.worker.running.values() if rj.link is self]

    def orphan_jobs(self, why: str) -> None:
        """The router that sent these jobs lost us (or we lost it): it has moved them elsewhere or is gone,
        so nobody waits for their results. Stop them, to give their slots to the routers still here."""
        jobs = self._jobs()
        if jobs:
            log.warning("router %s %s: stopping its %d job(s)", self.address, why, len(jobs))
        for rj in jobs:
            rj.link = None
            self.worker.stop_job(rj)

    def greet(self) -> None:
        self.seen_seq = 0  # a router that registers us anew numbers its REQUESTs from 1
        running = {rj.job_id: rj.model for rj in self._jobs()}
        self.send(Command.READY, messages.ready(self.worker.name, self.worker.capabilities(), running))

    def announce(self) -> None:
        """READY again to a router that knows us: the models changed. ``running`` is empty: this router counts
        those jobs already (docs/protocol.md "Models at run time")."""
        self.send(Command.READY, messages.ready(self.worker.name, self.worker.capabilities(), {}))

    def heartbeat(self) -> None:
        progress = {rj.job_id: rj.progress_n for rj in self._jobs()}
        self.worker.refresh_memory()
        self.send(Command.HEARTBEAT, messages.worker_heartbeat(
            load=self.worker.load(), jobs=list(progress), progress=progress, seen=self.seen_seq,
            backends=self.worker.backends(), draining=self.worker.draining,
            memory_free_mb=self.worker.device.get("memory_free_mb")))

    def close(self) -> None:
        if self._reader is not None:
            self._reader.unwatch()
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.close(0)

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, then every heartbeat interval: beat (or greet until welcomed) and check the router is
        alive; reconnect with backoff when it is silent too long. Frames are read by ``_read_one``."""
        reader = self._reader = SocketReader(asyncio.get_running_loop(), self._read_one)
        interval = self.worker.heartbeat_ms / 1000
        backoff = protocol.RECONNECT_MIN_S
        self._connect(reader)
        log.info("connecting to router %s as %s", self.address, self.worker.name)
        try:
            while True:
                await asyncio.sleep(interval)
                now = time.monotonic()
                if self.disconnected or now - self.last_heard > interval * self.worker.liveness:
                    why = "disconnected us" if self.disconnected else f"silent for {now - self.last_heard:.1f}s"
                    log.warning("router %s %s; reconnecting in %.2fs", self.address, why, backoff)
                    self.disconnected = False
                    self.close()
                    self.orphan_jobs(why)
                    await asyncio.sleep(backoff + random.uniform(0, backoff / 4))
                    backoff = min(backoff * 2, protocol.RECONNECT_MAX_S)
                    self._connect(reader)
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
            version = body.get("version")
            if not protocol.compatible(version):  # a router of another major version (it should have refused us)
                message = f"worker speaks mesh protocol {protocol.VERSION}, router sent {version}"
                log.error("refusing router %s: %s", self.address, message)
                self.send(Command.DISCONNECT, messages.disconnect(protocol.REASON_VERSION, message))
                self.welcomed = False
                self.disconnected = True  # reconnect with backoff at the next beat, until an operator upgrades
                return
            if not self.welcomed:
                log.info("registered with router %s", self.address)
            self.welcomed = True
        elif command == Command.REQUEST:
            self.worker.start_job(self, body)
        elif command == Command.CANCEL:
            self.worker.cancel_job(self, body)
        elif command in (Command.LOAD, Command.UNLOAD, Command.UPDATE):
            self.worker.admin.handle(self, command, body)
        elif command == Command.DISCONNECT:
            reason = body.get("reason")
            if reason == protocol.REASON_UNKNOWN:
                log.info("router %s does not know this worker (restarted?); announcing again", self.address)
                self.orphan_jobs("does not know this worker")
                self.welcomed = False
                self.greet()
            elif reason == protocol.REASON_VERSION:
                log.error("router %s refused this worker: %s", self.address, body.get("message"))
                self.disconnected = True  # reconnect with backoff at the next beat, until an operator upgrades
            else:
                log.warning("router %s disconnected: %s", self.address, reason)
                self.disconnected = True  # reconnect with backoff at the next beat
        elif command != Command.HEARTBEAT:
            log.warning("unexpected %s from router %s", command.name, self.address)
