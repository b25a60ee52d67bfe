"""Each model's backend in a process of its own, supervised by the worker (the way Ollama runs its runners).

The worker keeps the mesh link, the heartbeats and the job bookkeeping; the backend process
(worker/runner.py) loads the model and runs its jobs. When that process dies, by an abort or a segfault
in native code, the kernel's OOM killer, or the memory watchdog here, the worker stays in the mesh: the
jobs that were in it end with ``backend_crashed`` (the router decides whether a job is to blame, see
docs/protocol.md "Crashes"), and a new process is started after a backoff. A job that runs past its
``max_job_s``, or does not stop within ``cancel_grace_s`` of a cancel (stuck in native code), is ended
by killing its process; the other jobs in it are moved without blame (``backend_restarted``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Protocol

from velesio.backends import Backend, ModelConfig
from velesio.mesh import codec, messages
from velesio.mesh.protocol import Command

from . import ipc

log = logging.getLogger("velesio.worker")

RESTART_MIN_S = 0.5  # the first restart after a crash; doubles with each crash that follows soon after
RESTART_MAX_S = 30.0
STABLE_S = 60.0  # a backend process that served this long before crashing restarts after RESTART_MIN_S again
STOP_TIMEOUT_S = 5.0  # a backend process told to stop is killed after this long
MEMORY_SHARE = 0.75  # the default memory ceiling of a backend process: this share of the host's memory

_job_keys = itertools.count(1)  # the key of each job a worker hands to one of its backend processes


@dataclasses.dataclass(frozen=True)
class BackendLimits:
    """What one model's jobs may cost; mesh.yaml sets them per model (``max_job_s``, ``max_memory_mb``)."""

    max_job_s: float = 600.0  # a job running longer ends with a ``timeout`` error
    max_memory_mb: int | None = None  # the backend process's anonymous memory; None: MEMORY_SHARE of the host
    cancel_grace_s: float = 10.0  # a cancelled job still running after this long is ended by a restart


def meminfo_mb() -> dict[str, int]:
    """/proc/meminfo in MB (MemTotal, MemAvailable, ...); empty where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            return {line.split(":")[0]: int(line.split()[1]) // 1024 for line in f if len(line.split()) >= 2}
    except (OSError, ValueError):
        return {}


def host_memory_mb() -> int | None:
    """The memory this host (or this container's cgroup) has, in MB."""
    total = meminfo_mb().get("MemTotal")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            raw = f.read().strip()
        if raw.isdigit():
            cgroup = int(raw) // 2**20
            total = min(total, cgroup) if total else cgroup
    except OSError:
        pass
    return total


def anonymous_memory_mb(pid: int) -> float | None:
    """A process's resident anonymous memory (its allocations; not the model file it maps, which the kernel
    can drop and read again)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def timeout_message(model: str, limit_s: float) -> str:
    return f"the job ran longer than model {model}'s limit of {limit_s:g} s (max_job_s) and was stopped"


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "ended"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with code {returncode}"


@dataclasses.dataclass
class _Kill:
    """Why the watchdog killed a backend process: a crash (the jobs in it are to blame, as if it had died by
    itself) or a restart that ends the ``blame``d jobs with their own error and moves the others."""

    why: str
    crash: bool = False
    blame: dict[int, tuple[str, str]] = dataclasses.field(default_factory=dict)  # key -> (code, message)


class RunningJob:
    """The worker's record of one job attempt it runs."""

    __slots__ = ("key", "job_id", "attempt", "model", "link", "started", "progress_n", "cancel_at",
                 "timed_out", "slots", "process")

    def __init__(self, key: int, job_id: str, attempt: int, model: str, link: Any, slots: int = 1):
        self.key, self.job_id, self.attempt, self.model, self.link = key, job_id, attempt, model, link
        self.started = time.monotonic()
        self.progress_n = 0  # reported in heartbeats: the router's proof that the job is not stuck
        self.cancel_at: float | None = None
        self.timed_out = False
        self.slots = slots  # an exclusive job holds every slot of its model
        self.process: BackendProcess | None = None  # the process running it; None while it waits for one


class Events(Protocol):
    """What a backend process tells the worker (implemented by worker/runtime.py ``Worker``)."""

    def backend_out(self, rj: RunningJob, frame: bytes) -> None: ...
    def backend_progress(self, rj: RunningJob, n: int) -> None: ...
    def backend_end(self, rj: RunningJob, frame: bytes, outcome: str) -> None: ...
    def backend_lost(self, rj: RunningJob, code: str, message: str, details: dict[str, Any]) -> None: ...
    def backend_state(self, process: BackendProcess) -> None: ...


class _PipeProtocol(asyncio.Protocol):
    """The worker's end of a backend process's pipe: messages are handled as their bytes arrive, with no task
    woken per read (a job that does no work costs the pipe two messages each way)."""

    def __init__(self, process: BackendProcess, closed: asyncio.Future):
        self.process = process
        self.closed = closed
        self.unpacker = ipc.unpacker()

    def data_received(self, data: bytes) -> None:
        self.unpacker.feed(data)
        try:
            for message in self.unpacker:
                self.process.handle_message(message)
        except Exception:  # a garbled pipe or a bad message: that backend process cannot be trusted any more
            log.exception("model %s: bad message from its backend process; restarting it", self.process.name)
            self.process.kill(_Kill("it sent a bad message", crash=True))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class BackendProcess:
    """One model's backend process: start, feed jobs, watch, and restart it when it dies."""

    def __init__(self, config: ModelConfig, backend_cls: type[Backend], events: Events, limits: BackendLimits,
                 *, log_level: str = "INFO", log_json: bool = False, threads: int | None = None):
        self.config = config
        self.backend_path = f"{backend_cls.__module__}:{backend_cls.__qualname__}"
        self.events = events
        self.limits = limits
        self.log_level, self.log_json = log_level, log_json
        self.threads = threads
        ceiling = limits.max_memory_mb
        if ceiling is None:
            host = host_memory_mb()
            ceiling = int(host * MEMORY_SHARE) if host else None
        self.memory_limit_mb = ceiling
        self.state = "starting"  # starting | ready | restarting | failed | stopped
        self.meta: dict[str, Any] = {}
        self.operations: list[str] = list(backend_cls.operations)
        self.jobs: dict[int, RunningJob] = {}
        self.crashes = 0
        self.restarts = 0
        self.last_crash: str | None = None
        self.rss_mb: float | None = None
        self._proc: subprocess.Popen | None = None
        self._transport: asyncio.Transport | None = None
        self._loaded: asyncio.Future | None = None
        self._ready_since = 0.0
        self._quick_crashes = 0
        self._kill: _Kill | None = None  # set when the watchdog kills the process, read when it has ended
        self.retiring = False  # replaced by a new process (more slots): it finishes its jobs, never restarts
        self._tasks: set[asyncio.Task] = set()

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def status(self) -> messages.BackendStatus:
        """Advertised in READY and heartbeats, shown by the router's /health."""
        return messages.backend_status(self.state, self.pid, self.crashes, self.restarts, self.last_crash,
                                       round(self.rss_mb) if self.rss_mb else None, self.memory_limit_mb,
                                       self.limits.max_job_s)

    # ---- life cycle ----------------------------------------------------------------------------
    async def start(self) -> str | None:
        """Start the process and load the model; None when ready, else why it failed."""
        reason = await self._spawn()
        if reason is None:
            self.state = "ready"
            self._ready_since = time.monotonic()
        else:
            self.state = "failed"
        return reason

    async def _spawn(self) -> str | None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        args = [sys.executable, "-m", "velesio.worker.runner", "--fd", str(theirs.fileno()),
                "--name", self.name, "--parent", str(os.getpid()), "--log-level", self.log_level]
        if self.log_json:
            args.append("--log-json")
        # ggml's crash handler otherwise holds a dying process for seconds while it looks for a debugger.
        env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
        try:
            self._proc = subprocess.Popen(args, pass_fds=(theirs.fileno(),), env=env)
        except OSError as exc:
            ours.close()
            return f"cannot start a backend process: {exc}"
        finally:
            theirs.close()  # the child has its own copy
        closed = loop.create_future()
        transport, _ = await loop.create_unix_connection(lambda: _PipeProtocol(self, closed), sock=ours)
        self._transport = transport
        self._loaded = loop.create_future()
        self._track(self._wait_end(closed, self._proc))
        config = dataclasses.asdict(self.config)
        config.pop("threads", None)
        self._send([ipc.LOAD, config, self.backend_path, self.threads])
        return await self._loaded

    def _track(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _send(self, message: list[Any]) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(ipc.pack(message))

    async def stop(self) -> None:
        """Close the backend and end the process (killed after STOP_TIMEOUT_S)."""
        self.state = "stopped"
        proc = self._proc
        self._send([ipc.STOP])
        if proc is not None:
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                proc.kill()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- jobs ------------------------------------------------------------------------------------
    def new_job(self, job_id: str, attempt: int, link: Any, slots: int = 1) -> RunningJob:
        # Keys are unique across processes: a job accepted for one process may run in its successor.
        return RunningJob(next(_job_keys), job_id, attempt, self.name, link, slots)

    def run(self, rj: RunningJob, wire: dict[str, Any], window_s: float) -> None:
        rj.process = self
        self.jobs[rj.key] = rj
        self._send([ipc.RUN, rj.key, wire, window_s])

    def cancel(self, rj: RunningJob, keep: bool = False) -> None:
        if rj.key in self.jobs:
            if rj.cancel_at is None:
                rj.cancel_at = time.monotonic()
            self._send([ipc.CANCEL, rj.key, keep])

    def set_threads(self, n: int) -> None:
        self.threads = n
        self._send([ipc.THREADS, n])

    # ---- what the process says -------------------------------------------------------------------
    async def _wait_end(self, closed: asyncio.Future, proc: subprocess.Popen) -> None:
        await closed
        await self._ended(proc)

    def handle_message(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == ipc.OUT:
            rj = self.jobs.get(message[1])
            if rj is not None:
                self.events.backend_out(rj, message[2])
        elif kind == ipc.PROGRESS:
            rj = self.jobs.get(message[1])
            if rj is not None:
                self.events.backend_progress(rj, int(message[2]))
        elif kind == ipc.END:
            rj = self.jobs.pop(message[1], None)
            if rj is not None:
                frame, outcome = message[2], str(message[3])
                if rj.timed_out and outcome != "ok":
                    frame, outcome = self._timeout_frame(rj), "timeout"
                self.events.backend_end(rj, frame, outcome)
        elif kind == ipc.LOADED:
            self.meta = dict(message[1] or {})
            self.operations = [str(op) for op in message[2]]
            if self._loaded is not None and not self._loaded.done():
                self._loaded.set_result(None)
        elif kind == ipc.LOAD_FAILED:
            if self._loaded is not None and not self._loaded.done():
                self._loaded.set_result(str(message[1]))

    def _timeout_frame(self, rj: RunningJob) -> bytes:
        return codec.encode(Command.ERROR, messages.error(rj.job_id, rj.attempt, "timeout",
                                                          timeout_message(self.name, self.limits.max_job_s)))

    async def _ended(self, proc: subprocess.Popen) -> None:
        """The process closed its pipe: it died (or was stopped). Settle its jobs, then restart it."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + 2.0
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        if proc.poll() is None:
            proc.kill()
            await loop.run_in_executor(None, proc.wait)
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        how = describe_exit(proc.returncode)
        kill, self._kill = self._kill, None
        why = kill.why if kill else how
        if self._loaded is not None and not self._loaded.done():
            self._loaded.set_result(f"the backend process {how} while loading the model")
        if self.state == "stopped":
            return
        jobs, self.jobs = self.jobs, {}
        crashed = kill is None or kill.crash
        blamed = kill.blame if kill else {}
        restart = self.state == "ready" and not self.retiring
        if restart:
            if crashed:
                self.crashes += 1
                self.last_crash = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {why}"
                log.error("model %s: backend process %s %s with %d job(s) in it; restarting", self.name,
                          proc.pid, why, len(jobs))
            else:
                log.warning("model %s: backend process %s restarted (%s)", self.name, proc.pid, why)
            stable = time.monotonic() - self._ready_since >= STABLE_S
            self._quick_crashes = 0 if stable else self._quick_crashes + 1
            # The routers hear that the model is down before they hear of its jobs, so that the jobs they
            # move are not sent straight back here to be refused.
            self.state = "restarting"
            self.events.backend_state(self)
        for rj in jobs.values():
            if rj.key in blamed:
                code, message = blamed[rj.key]
                self.events.backend_lost(rj, code, message, {})
            elif crashed:
                self.events.backend_lost(rj, "backend_crashed",
                                         f"the backend process of model {self.name} {why} while running this job",
                                         {"alone": len(jobs) == 1, "jobs": len(jobs), "reason": why})
            else:
                self.events.backend_lost(rj, "backend_restarted",
                                         f"the backend process of model {self.name} was restarted ({why})", {})
        if restart:
            self._track(self._restart())

    async def _restart(self) -> None:
        while self.state == "restarting":
            delay = min(RESTART_MAX_S, RESTART_MIN_S * 2 ** max(0, self._quick_crashes - 1))
            await asyncio.sleep(delay)
            if self.state != "restarting":
                return
            reason = await self._spawn()
            if self.state != "restarting":
                return
            if reason is None:
                self.restarts += 1
                self.state = "ready"
                self._ready_since = time.monotonic()
                log.info("model %s: backend process %s ready again (restart %d)", self.name, self.pid,
                         self.restarts)
                self.events.backend_state(self)
                return
            log.error("model %s: the restarted backend process failed: %s", self.name, reason)
            self._quick_crashes += 1

    # ---- the watchdog ----------------------------------------------------------------------------
    def watch(self, now: float) -> None:
        """Called a few times a second: the memory ceiling, job durations and cancel grace."""
        proc = self._proc
        if proc is None or self.state != "ready" or self._kill is not None:
            return
        self.rss_mb = anonymous_memory_mb(proc.pid)
        if self.memory_limit_mb and self.rss_mb and self.rss_mb > self.memory_limit_mb:
            self.kill(_Kill(f"memory ceiling exceeded ({self.rss_mb:.0f} MB > max_memory_mb "
                            f"{self.memory_limit_mb} MB)", crash=True))
            return
        blame: dict[int, tuple[str, str]] = {}
        for rj in self.jobs.values():
            if not rj.timed_out and now - rj.started > self.limits.max_job_s:
                rj.timed_out = True
                log.warning("job %s on %s: over max_job_s (%g s); cancelling", rj.job_id, self.name,
                            self.limits.max_job_s)
                self.cancel(rj)
            elif rj.cancel_at is not None and now - rj.cancel_at > self.limits.cancel_grace_s:
                if rj.timed_out:
                    blame[rj.key] = ("timeout", timeout_message(self.name, self.limits.max_job_s))
                else:
                    blame[rj.key] = ("cancelled", "cancelled")
        if blame:
            self.kill(_Kill(f"{len(blame)} job(s) did not stop within cancel_grace_s "
                            f"({self.limits.cancel_grace_s:g} s) of being stopped", blame=blame))

    def kill(self, kill: _Kill) -> None:
        log.error("model %s: killing backend process %s: %s", self.name, self.pid, kill.why)
        self._kill = kill
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()


