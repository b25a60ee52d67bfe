"""What the router knows of each live worker and each accepted job; kept by the scheduler."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from typing import Any

from velesio.mesh.jobs import Job


class WorkerState:
    def __init__(self, identity: bytes, greeting: dict[str, Any], clock: Callable[[], float] = time.monotonic):
        self.identity = identity
        self.clock = clock
        self.name = str(greeting.get("worker") or identity.decode(errors="replace"))
        self.version = str(greeting.get("version"))
        self.backends: dict[str, dict[str, Any]] = {}  # model -> its backend process (state, crashes, restarts)
        self.update(greeting.get("capabilities") or {})  # after ``backends``: READY's capabilities carry them
        self.running: dict[tuple[str, int], tuple[str, int]] = {}  # (job id, attempt) -> (model, slots held);
        self.busy: dict[str, int] = {}  # model -> slots held; start_job / end_job / clear_jobs keep both
        # model -> slots other routers hold on this worker (several routers share a worker), from its
        # heartbeats; set to "all the rest" when the worker refuses a job as busy, until its next heartbeat
        self.others: dict[str, int] = {}
        self.last_seen = clock()
        self.registered_at = time.time()
        self.jobs_done = 0
        self.last_dispatch = 0.0
        self.draining = False
        self.seq = 0  # REQUEST sequence number, per worker connection

    def update(self, caps: dict[str, Any]) -> None:
        self.caps = caps
        self.update_backends(caps.get("backends"))
        self.models: dict[str, dict[str, Any]] = {}
        for m in caps.get("models") or []:
            if isinstance(m, dict) and isinstance(m.get("name"), str):
                m.setdefault("slots", 1)
                m.setdefault("operations", [])
                m.setdefault("meta", {})
                self.models[m["name"]] = m

    def update_backends(self, backends: Any) -> None:
        """The state of each model's backend process, from READY or a heartbeat (docs/protocol.md)."""
        if isinstance(backends, dict):
            self.backends = {str(k): v for k, v in backends.items() if isinstance(v, dict)}

    def available(self, model: str) -> bool:
        """False while the model's backend process restarts after a crash, loads, or drains before an unload. A
        model asleep (idle past its keep_alive) takes jobs: the worker loads it again for them."""
        state = self.backends.get(model, {}).get("state", "ready")
        return state in ("ready", "sleeping")

    def asleep(self, model: str) -> bool:
        return self.backends.get(model, {}).get("state") == "sleeping"

    def state(self, model: str) -> str:
        """Its backend process's state: ready, restarting, sleeping, draining, ... (docs/protocol.md)."""
        return str(self.backends.get(model, {}).get("state", "ready"))

    def start_job(self, key: tuple[str, int], model: str, slots: int = 1) -> None:
        if key not in self.running:
            self.running[key] = (model, slots)
            self.busy[model] = self.busy.get(model, 0) + slots

    def end_job(self, key: tuple[str, int]) -> str | None:
        """The model of a job that ended, None for a job this worker was not running."""
        entry = self.running.pop(key, None)
        if entry is None:
            return None
        model, slots = entry
        self.busy[model] -= slots
        return model

    def note_load(self, free: dict[str, Any], listed: set[str]) -> None:
        """A heartbeat's ``load`` (free slots per model, whoever holds the others) and ``jobs`` (this router's
        jobs the worker runs): what is neither free nor ours is held by other routers."""
        ours: dict[str, int] = {}
        for (job_id, _attempt), (model, slots) in self.running.items():
            if job_id in listed:
                ours[model] = ours.get(model, 0) + slots
        for model, m in self.models.items():
            reported = free.get(model)
            if isinstance(reported, int) and not isinstance(reported, bool):
                self.others[model] = max(0, int(m["slots"]) - reported - ours.get(model, 0))

    def refused(self, model: str) -> None:
        """The worker said busy: another router holds what we thought free, until the next heartbeat."""
        if model in self.models:
            self.others[model] = max(0, int(self.models[model]["slots"]) - self.busy.get(model, 0))

    def clear_jobs(self) -> None:
        self.running.clear()
        self.busy.clear()

    def free(self, model: str) -> int:
        if not self.available(model):
            return 0
        return max(0, int(self.models[model]["slots"]) - self.busy.get(model, 0) - self.others.get(model, 0))

    @property
    def kinds(self) -> set[str]:
        return {m.get("kind", "text") for m in self.models.values()}

    def summary(self) -> dict[str, Any]:
        current = [job for job, _ in self.running]
        kinds = sorted(self.kinds)
        return {
            "id": self.name,
            "type": "+".join({"text": "llm", "image": "sd"}.get(k, k) for k in kinds) or "none",
            "status": "draining" if self.draining else "busy" if self.running else "idle",
            "current_job": current[0] if current else None,
            "jobs_in_flight": len(self.running),
            "jobs_done": self.jobs_done,
            "host": self.caps.get("host"),
            "device": self.caps.get("device"),
            "memory_total_mb": self.caps.get("memory_total_mb"),
            "memory_free_mb": self.caps.get("memory_free_mb"),
            "models": [{"name": n, "slots": m["slots"], "free": self.free(n), "kind": m.get("kind"),
                        "state": self.state(n),
                        **({"backend_process": self.backends[n]} if n in self.backends else {})}
                       for n, m in sorted(self.models.items())],
            "loading": sorted(n for n, b in self.backends.items() if b.get("state") == "loading"),
            "failures": self.caps.get("failures") or [],
            "heartbeat_age_s": round(self.clock() - self.last_seen, 3),
        }


class JobEvents:
    """What a job's handler reads: ("partial", chunk) ... then one ("final", result) or ("error", ApiError).
    One reader, fed by the scheduler on the same event loop; an ``asyncio.Queue`` does the same with a
    lock-free but heavier path (an Event, getter and putter queues) paid on every job."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: collections.deque[tuple[str, Any]] = collections.deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: tuple[str, Any]) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> tuple[str, Any]:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()


class JobRecord:
    """A job accepted by the router, from submission to its one result or error."""

    def __init__(self, job: Job, clock: Callable[[], float] = time.monotonic, *, tenant: str = "anonymous",
                 priority: int = 0, weight: float = 1.0):
        self.job = job
        self.tenant = tenant  # the token name it came with: the unit of fair share (router/fairqueue.py)
        self.priority = priority
        self.weight = weight
        self.queued_at = clock()
        # the prompt's block hashes cache-aware routing matches (router/affinity.py); None: not a text job
        self.prefixes: list[tuple[tuple[str, int], int]] | None = None
        self.refusals = 0  # times a worker answered "busy" (not failures: see Scheduler._refused)
        self.skipped = 0  # jobs placed before it, while it was the head of its queue, for their cache
        self.events = JobEvents()
        self.worker: WorkerState | None = None
        self.text_so_far = ""
        self.tokens_so_far = 0
        self.tokens_resumed = 0  # of tokens_so_far, those already taken off max_tokens by earlier failovers
        self.progress: dict[str, Any] = {}
        self.done = False
        self.created = time.time()
        self.last_activity = clock()
        self.failovers = 0
        self.progress_count = -1
        self.dispatch_seq = 0
        self.crashes = 0  # backends this job crashed while alone in them (docs/protocol.md "Crashes")
        self.shared_crashes = 0  # backends that crashed while running this job among others

    @property
    def visible(self) -> bool:
        return bool(self.text_so_far)
