"""A fake mesh around the router's scheduler: no processes, no sockets, no sleeping.

The scheduler (router/scheduler.py) is socket-free: frames from workers go in through ``process_worker`` and
frames out through its ``send`` callable. ``FakeMesh`` owns a ``Scheduler`` on a clock the test moves by hand,
records every frame the scheduler sends (decoded), and speaks for workers::

    mesh = FakeMesh(job_stall_s=10)
    mesh.join(b"w1")
    rec = mesh.submit(prompt="hi")
    request = mesh.request_for(rec)          # the REQUEST body, sent to mesh.where(request)
    mesh.partial(b"w1", request, "Hel")
    mesh.advance(11)
    mesh.tick()                              # the job stalled: CANCEL to w1, failover
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, cast

from velesio.mesh import codec, messages, protocol
from velesio.mesh.jobs import Job
from velesio.mesh.params import Result, params_from_wire, to_wire
from velesio.mesh.protocol import Command
from velesio.router.records import JobRecord
from velesio.router.scheduler import Scheduler

__all__ = ["FakeClock", "FakeMesh", "Sent"]


class FakeClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a monotonic clock does not go back")
        self.now += seconds


@dataclasses.dataclass(frozen=True)
class Sent:
    """One frame the scheduler sent, decoded."""

    identity: bytes
    command: Command
    body: dict[str, Any]


class FakeMesh:
    """A scheduler, what it sent, and helpers that speak for workers. Keyword arguments go to ``Scheduler``."""

    def __init__(self, **scheduler_kw: Any):
        self.clock = FakeClock()
        self.sent: list[Sent] = []
        self.scheduler = Scheduler(self._record, clock=self.clock, **scheduler_kw)

    def _record(self, identity: bytes, frame: bytes) -> None:
        command, body = codec.decode(frame)
        self.sent.append(Sent(identity, command, body))

    # ---- time --------------------------------------------------------------------------------
    def advance(self, seconds: float) -> None:
        """Move the scheduler's clock (timers run only on ``tick``)."""
        self.clock.advance(seconds)

    def tick(self) -> None:
        self.scheduler.tick()

    @property
    def expiry_s(self) -> float:
        """How long a worker may stay silent before the scheduler removes it."""
        return self.scheduler.heartbeat_ms * self.scheduler.liveness / 1000

    # ---- jobs --------------------------------------------------------------------------------
    def submit(self, op: str = "completion", model: str = "m", *, stream: bool = False,
               **params: Any) -> JobRecord:
        """A job as a dialect hands it over: ``params`` are fields of the op's params type (velesio.mesh.params),
        the mesh's defaults for the others; ``prompt`` is "x" unless given."""
        params.setdefault("prompt", "x")
        return self.scheduler.submit(Job(op=op, model=model, params=params_from_wire(op, params), stream=stream))

    def cancel(self, rec: JobRecord, keep: bool = False) -> None:
        self.scheduler.cancel(rec, keep)

    @staticmethod
    def events(rec: JobRecord) -> list[tuple[str, Any]]:
        """Every event the job's handler has not read yet, in order (partials, then one final or error)."""
        return list(rec.events._items)

    @classmethod
    def outcome(cls, rec: JobRecord) -> tuple[str, Any] | None:
        """The job's ("final", result) or ("error", ApiError); None while it runs."""
        ended = [event for event in cls.events(rec) if event[0] != "partial"]
        assert len(ended) <= 1, f"the job ended more than once: {ended}"
        return ended[0] if ended else None

    # ---- what the scheduler sent -------------------------------------------------------------
    def frames(self, command: Command | None = None, identity: bytes | None = None) -> list[Sent]:
        return [s for s in self.sent
                if (command is None or s.command == command) and (identity is None or s.identity == identity)]

    def requests(self, identity: bytes | None = None) -> list[dict[str, Any]]:
        """The REQUEST bodies sent (to ``identity``), in order."""
        return [s.body for s in self.frames(Command.REQUEST, identity)]

    def cancels(self, identity: bytes | None = None) -> list[dict[str, Any]]:
        return [s.body for s in self.frames(Command.CANCEL, identity)]

    def request_for(self, rec: JobRecord) -> dict[str, Any]:
        """The latest REQUEST sent for the job (its live attempt, unless it waits in the queue)."""
        bodies = [body for body in self.requests() if body["id"] == rec.job.id]
        assert bodies, f"job {rec.job.id} was never dispatched"
        return bodies[-1]

    def where(self, request: dict[str, Any]) -> bytes:
        """The worker a REQUEST (a body from ``requests``) was sent to."""
        for s in self.frames(Command.REQUEST):
            if s.body["id"] == request["id"] and s.body["attempt"] == request["attempt"]:
                return s.identity
        raise AssertionError(f"no REQUEST for job {request['id']} attempt {request['attempt']}")

    # ---- speaking for workers ----------------------------------------------------------------
    def deliver(self, identity: bytes, command: Command, body: Mapping[str, Any] | None = None) -> None:
        """A frame from a worker, as the broker hands it to the scheduler."""
        self.scheduler.process_worker(identity, codec.encode(command, body))

    def join(self, identity: bytes, models: Sequence[str] = ("m",), *, slots: int = 1,
             operations: Sequence[str] = ("completion", "chat"), kind: str = "text",
             backends: Mapping[str, dict[str, Any]] | None = None, running: Mapping[str, str] | None = None,
             version: str = protocol.VERSION) -> None:
        """READY: the worker offers ``models``, each with ``slots`` slots and ``operations``."""
        caps: dict[str, Any] = {"models": [{"name": name, "kind": kind, "operations": list(operations),
                                            "slots": slots} for name in models]}
        if backends is not None:
            caps["backends"] = dict(backends)
        self.deliver(identity, Command.READY, messages.ready(identity.decode(), caps, dict(running or {}), version))

    def heartbeat(self, identity: bytes, *, jobs: Sequence[str] | None = None,
                  progress: Mapping[str, int] | None = None, seen: int | None = None,
                  backends: Mapping[str, dict[str, Any]] | None = None, draining: bool | None = None,
                  load: Mapping[str, int] | None = None) -> None:
        """HEARTBEAT with only the fields given (a bare one is just a sign of life); ``load``: free slots per
        model, whichever router holds the others."""
        self.deliver(identity, Command.HEARTBEAT, messages.worker_heartbeat(
            jobs=None if jobs is None else list(jobs), progress=None if progress is None else dict(progress),
            seen=seen, draining=draining, load=None if load is None else dict(load),
            # Entries as given: a test may send only the keys it needs.
            backends=None if backends is None else cast("dict[str, messages.BackendStatus]", dict(backends))))

    def partial(self, identity: bytes, request: dict[str, Any], text: str | None = None, *,
                tokens: Sequence[int] | None = None, chunk: dict[str, Any] | None = None) -> None:
        """PARTIAL for the attempt of ``request``: a text piece (one token unless ``tokens``), or ``chunk``."""
        if chunk is None:
            chunk = {"text": text or "", "tokens": list(tokens) if tokens is not None else [0]}
        self.deliver(identity, Command.PARTIAL, messages.partial(request["id"], request["attempt"], [chunk]))

    def final(self, identity: bytes, request: dict[str, Any], result: Result | dict[str, Any] | None = None) -> None:
        """FINAL for the attempt of ``request``: ``result`` (a typed result, or a map of its fields, as on the
        wire), by default ``{"text": "ok"}``."""
        if result is None:
            result = {"text": "ok"}
        wire = result if isinstance(result, dict) else to_wire(result)
        self.deliver(identity, Command.FINAL, messages.final(request["id"], request["attempt"], wire))

    def error(self, identity: bytes, request: dict[str, Any], code: str, message: str | None = None,
              details: dict[str, Any] | None = None) -> None:
        self.deliver(identity, Command.ERROR, messages.error(request["id"], request["attempt"], code, message or code,
                                                             details))

    def crash(self, identity: bytes, request: dict[str, Any], *, alone: bool, jobs: int = 1,
              reason: str = "killed by SIGABRT") -> None:
        """ERROR ``backend_crashed``: the backend process died while running the job."""
        self.error(identity, request, "backend_crashed", "crashed",
                   {"alone": alone, "jobs": jobs, "reason": reason})

    def leave(self, identity: bytes, reason: str = protocol.REASON_LEAVING) -> None:
        """DISCONNECT from the worker: it is going away."""
        self.deliver(identity, Command.DISCONNECT, messages.disconnect(reason))
