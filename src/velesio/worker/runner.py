"""A backend process: one model's backend, run apart from the worker that supervises it (worker/supervisor.py).

Whatever a job does to this process (an abort in native code, a segfault, the kernel's OOM killer, a
runaway allocation the worker's memory watchdog kills) ends this process only: the worker keeps its mesh
link, reports the crash and starts a new backend process. Started by the worker as
``python -m velesio.worker.runner --fd N``; it speaks the pipe protocol of worker/ipc.py on that descriptor.
Jobs run in threads, as they did in the worker; the asyncio loop on the main thread reads the pipe and
times the PARTIAL windows (worker/partials.py), so a stream's pieces leave this process already batched.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import importlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from velesio import loop as event_loop
from velesio.backends import Backend, BackendError, JobContext, ModelConfig, reported_code
from velesio.logs import setup_logging
from velesio.mesh import codec, messages
from velesio.mesh.jobs import Job
from velesio.mesh.params import RESULT_BY_OP, to_wire
from velesio.mesh.protocol import ERROR_CODES, Command

from . import ipc
from .jobthreads import JobThreads
from .partials import PartialBatch

log = logging.getLogger("velesio.worker")

PROGRESS_EVERY_S = 0.2  # how often a job that does not stream tells the worker it is still moving


class _PipeLink:
    """PartialBatch's link in a backend process: a PARTIAL goes to the worker as a finished frame."""

    __slots__ = ("pipe", "key")

    def __init__(self, pipe: ipc.BlockingPipe, key: int):
        self.pipe, self.key = pipe, key

    def send(self, command: Command, body: Mapping[str, Any]) -> None:
        self.pipe.send([ipc.OUT, self.key, codec.encode(command, body)])


class Runner:
    def __init__(self, pipe: ipc.BlockingPipe, name: str):
        self.pipe = pipe
        self.name = name
        self.backend: Backend | None = None
        self.jobs: dict[int, JobContext] = {}
        self.pool = JobThreads(f"{name}-job")
        self.loop: asyncio.AbstractEventLoop | None = None
        self.done = asyncio.Event()
        self.threads: int | None = None  # the latest CPU share the worker sent

    # ---- the pipe ----------------------------------------------------------------------------
    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        unpacker = ipc.unpacker()
        sock = self.pipe.sock

        def readable() -> None:
            try:
                data = sock.recv(1 << 20)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:  # the worker is gone: nothing here is worth finishing
                os._exit(0)
            unpacker.feed(data)
            for message in unpacker:
                try:
                    self.process(message)
                except Exception:  # a bad message must not end the process
                    log.exception("backend process %s: cannot handle a message from the worker", self.name)

        self.loop.add_reader(sock.fileno(), readable)
        await self.done.wait()

    def process(self, message: list[Any]) -> None:
        kind = message[0]
        if kind == ipc.RUN:
            try:
                self.start_job(message[1], message[2], float(message[3]))
            except Exception as exc:  # the job still ends with its one ERROR
                log.exception("backend process %s: cannot start a job", self.name)
                wire = message[2] if isinstance(message[2], dict) else {}
                attempt = wire.get("attempt")
                self.pipe.send([ipc.END, message[1], codec.encode(Command.ERROR, messages.error(
                    str(wire.get("id")), attempt if isinstance(attempt, int) else -1, "internal_error",
                    f"the job could not be started: {type(exc).__name__}")), "internal_error"])
        elif kind == ipc.CANCEL:
            ctx = self.jobs.get(message[1])
            if ctx is not None:
                ctx.cancel(keep_partial=bool(message[2]))
        elif kind == ipc.THREADS:
            self.threads = int(message[1])
            if self.backend is not None:
                self.backend.set_threads(self.threads)
        elif kind == ipc.LOAD:
            # A thread that ends after loading, not a pool's: an OpenMP runtime (llama.cpp's CPU build) keeps a
            # team of threads for each thread that ran a parallel region while that thread lives, and with more
            # of its threads than cores it stops spinning at barriers (a third slower decoding, measured).
            threading.Thread(target=self.load, args=(message[1], message[2], message[3]), name=f"{self.name}-load",
                             daemon=True).start()
        elif kind == ipc.STOP:
            for ctx in list(self.jobs.values()):
                ctx.cancel()
            self.done.set()

    # ---- the backend -------------------------------------------------------------------------
    def load(self, config: dict[str, Any], backend_path: str, threads: int | None) -> None:
        try:
            module, _, qualname = backend_path.partition(":")
            cls: Any = importlib.import_module(module)
            for part in qualname.split("."):
                cls = getattr(cls, part)
            backend = cls(ModelConfig(**{**config, "threads": threads}))
            meta = backend.load() or {}
            if self.threads is not None and self.threads != threads:  # the share changed while loading
                backend.set_threads(self.threads)
            operations = list(meta.get("operations") or cls.operations)
            meta = {k: v for k, v in meta.items() if k != "operations"}
        except BaseException as exc:  # noqa: BLE001 - a model that fails to load is reported, not fatal
            log.error("model %s (%s) failed to load: %s: %s", config.get("name"), config.get("backend"),
                      type(exc).__name__, exc)
            self.pipe.send([ipc.LOAD_FAILED, f"{type(exc).__name__}: {exc}"])
            return
        self.backend = backend  # before LOADED: the first job may follow it at once
        self.pipe.send([ipc.LOADED, meta, operations])

    def start_job(self, key: int, wire: dict[str, Any], window_s: float) -> None:
        if self.loop is None:
            raise RuntimeError("the backend process is not serving yet")
        try:
            job = Job.from_wire(wire)
        except ValueError as exc:  # an operation this version does not know (the worker refuses those first)
            attempt = wire.get("attempt")
            self.pipe.send([ipc.END, key, codec.encode(Command.ERROR, messages.error(
                str(wire.get("id")), attempt if isinstance(attempt, int) else -1, "invalid_request",
                f"the job cannot be run here: {exc}")), "invalid_request"])
            return
        partials = PartialBatch(_PipeLink(self.pipe, key), job.id, job.attempt, window_s, self.loop)
        forward = job.stream
        last_progress = [0.0]

        def emit(chunk: dict[str, Any]) -> None:
            ctx.progress_n += 1
            if forward or "step" in chunk:
                partials.add(chunk)
                return
            now = time.monotonic()
            if now - last_progress[0] >= PROGRESS_EVERY_S:
                last_progress[0] = now
                self.pipe.send([ipc.PROGRESS, key, ctx.progress_n])

        ctx = JobContext(job, emit)
        self.jobs[key] = ctx
        self.pool.submit(self.run_job, key, job, ctx, partials)

    def run_job(self, key: int, job: Job, ctx: JobContext, partials: PartialBatch) -> None:
        """In a job thread: run the backend, send the pieces still waiting, then the job's one FINAL or ERROR."""
        try:
            if self.backend is None:
                raise BackendError("the model is not loaded")
            result, exc = self.backend.run(job, ctx), None
        except BaseException as err:  # noqa: BLE001 - every failure becomes the job's one ERROR
            result, exc = None, err
        partials.flush()
        self.jobs.pop(key, None)
        expected = RESULT_BY_OP.get(job.op)
        if exc is None and (expected is None or not isinstance(result, expected)):
            # A backend bug: the router reads the result of each operation as its type (mesh/params.py).
            wanted = expected.__name__ if expected is not None else "a result"
            log.warning("job %s: backend %s (model %s) returned %s for %s, not a %s; reported as internal_error",
                        job.id, getattr(self.backend, "name", "?"), self.name, type(result).__name__, job.op, wanted)
            frame = codec.encode(Command.ERROR, messages.error(
                job.id, job.attempt, "internal_error",
                f"the backend of model {self.name} returned a {type(result).__name__}, not a {wanted}"))
            outcome = "internal_error"
        elif exc is None:
            try:
                frame, outcome = codec.encode(Command.FINAL, messages.final(job.id, job.attempt, to_wire(result))), "ok"
            except (TypeError, ValueError) as err:  # a result msgpack cannot carry (a backend bug)
                log.error("job %s: the result of %s cannot be sent: %s", job.id, self.name, err)
                frame, outcome = codec.encode(Command.ERROR, messages.error(
                    job.id, job.attempt, "internal_error",
                    f"the backend of model {self.name} returned an unsendable result")), "internal_error"
        elif isinstance(exc, BackendError):
            code = reported_code(exc)
            if code != exc.code:  # a code the router does not know: say so here, where the backend is named
                log.warning("job %s: backend %s (model %s) raised %s with error code %r, which is not one of %s; "
                            "reported as internal_error", job.id, getattr(self.backend, "name", "?"), self.name,
                            type(exc).__name__, exc.code, ", ".join(ERROR_CODES))
            frame, outcome = codec.encode(Command.ERROR, messages.error(job.id, job.attempt, code,
                                                                        str(exc) or code)), code
        else:
            log.error("job %s failed: %s: %s", job.id, type(exc).__name__, exc, exc_info=exc)
            frame, outcome = codec.encode(Command.ERROR, messages.error(
                job.id, job.attempt, "internal_error", f"the backend failed: {type(exc).__name__}: {exc}")), \
                "internal_error"
        self.pipe.send([ipc.END, key, frame, outcome])

    def close(self) -> None:
        self.pool.shutdown()
        if self.backend is not None:
            try:
                self.backend.close()
            except Exception:  # noqa: BLE001 - closing is best effort on the way out
                log.exception("closing the backend of %s failed", self.name)


def _die_with_parent(parent: int | None) -> None:
    """Linux: the kernel kills this process when the worker dies, even if this process is stuck in native
    code and never reads the pipe's end."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if parent is not None and os.getppid() != parent:  # the worker died before the line above
        os._exit(0)


def _first_to_go() -> None:
    """Under memory pressure the kernel's OOM killer picks a backend process before its worker or router."""
    try:
        with open("/proc/self/oom_score_adj", "w") as f:
            f.write("500")
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="velesio-worker backend process")
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--name", default="backend")
    p.add_argument("--parent", type=int, help="the worker's pid")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--log-json", action="store_true")
    args = p.parse_args(argv)
    setup_logging(args.log_level, json_lines=args.log_json)
    # Ctrl-C, or a service manager stopping the whole group, reaches the worker, which drains and then stops
    # this process itself (or the kernel does, when the worker is gone).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _die_with_parent(args.parent)
    _first_to_go()
    sock = socket.socket(fileno=args.fd)
    sock.setblocking(True)
    runner = Runner(ipc.BlockingPipe(sock), args.name)
    try:
        event_loop.run(runner.serve())
    finally:
        runner.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
