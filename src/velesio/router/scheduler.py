"""The router's view of the mesh and its job scheduler. Socket-free: frames come in through
``process_worker`` and go out through the ``send`` callable, so the runner (router/broker.py) owns the
ZeroMQ socket and tests can drive this directly."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import time
from collections.abc import Callable
from typing import Any

import msgpack

from velesio.mesh import codec, messages, protocol
from velesio.mesh.jobs import Job
from velesio.mesh.params import TextParams, TextResult, to_wire
from velesio.mesh.protocol import Command

from .affinity import PrefixIndex, prompt_key
from .errors import ApiError
from .fairqueue import FairQueue
from .records import JobRecord, WorkerState

__all__ = ["JobRecord", "Scheduler", "WorkerState"]

log = logging.getLogger("velesio.router")

MAX_ATTEMPTS = 4
MAX_REFUSALS = 100  # "busy" answers a job may get (several routers racing for slots) before it ends with 503
AFFINITY_WINDOW = 16  # how far down the queue a free worker looks for a job whose prompt it has cached
AFFINITY_SKIPS = 8  # how many such jobs may go before the head of the queue
JOB_CRASH_LIMIT = 1  # backends a job may crash, alone in them, before it ends with job_crashed_backend
SHARED_CRASH_LIMIT = 2  # backends a job may be in when they crash among other jobs


def params_digest(job: Job) -> str:
    """What a log may say of a job's parameters: a digest and their sizes, never the prompt or the token."""
    fields = to_wire(job.params)
    try:
        packed = msgpack.packb([job.op, fields], use_bin_type=True)
    except Exception:  # noqa: BLE001 - parameters that cannot be packed were refused before dispatch
        packed = repr(sorted(fields)).encode()
    sizes = ",".join(f"{k}={len(v)}" for k, v in sorted(fields.items()) if isinstance(v, (str, list, dict)) and v)
    return f"sha256:{hashlib.sha256(packed).hexdigest()[:16]} {job.op} [{sizes}]"


class Scheduler:
    def __init__(self, send: Callable[[bytes, bytes], None], *, queue_max: int = 64,
                 heartbeat_ms: int = protocol.HEARTBEAT_MS, liveness: int = protocol.LIVENESS,
                 job_stall_s: float = 60.0, worker_wait_s: float = 5.0,
                 default_models: dict[str, str | None] | None = None, router_name: str = "router",
                 job_crash_limit: int = JOB_CRASH_LIMIT, aging_s: float = 30.0, routing: str = "cache_aware",
                 affinity_imbalance: float = 0.5, clock: Callable[[], float] = time.monotonic):
        self.send = send
        self.clock = clock  # what liveness, stalls and dispatch times are measured with (tests move it by hand)
        self.queue_max = queue_max
        self.heartbeat_ms = heartbeat_ms
        self.liveness = liveness
        self.job_stall_s = job_stall_s
        self.worker_wait_s = worker_wait_s
        self.default_models = default_models or {}
        self.router_name = router_name
        self.job_crash_limit = job_crash_limit
        self.workers: dict[bytes, WorkerState] = {}
        self.jobs: dict[str, JobRecord] = {}
        # model -> its waiting jobs, in fair order between tokens (router/fairqueue.py)
        self.queues: dict[str, FairQueue] = collections.defaultdict(lambda: FairQueue(self.clock, aging_s))
        self.known_models: set[str] = set()
        # cache-aware routing (router/affinity.py); None: least loaded only
        self.affinity = PrefixIndex() if routing == "cache_aware" else None
        self.affinity_imbalance = affinity_imbalance  # how much busier (fraction of slots) a cached worker may be
        self.completed: collections.deque[float] = collections.deque()
        self.mesh_changed = asyncio.Event()
        self._defaults: dict[str, str | None] = {}  # op -> the model it runs on when a request names none
        self.accepting = True
        self.observer: Any = None  # router/metrics.py: observe(event, rec, **data)
        # REPLY id -> (worker identity, the future its LOAD, UNLOAD or UPDATE waits on) (router/admin_routes.py)
        self.replies: dict[str, tuple[bytes, asyncio.Future]] = {}

    def _observe(self, event: str, rec: JobRecord, **data: Any) -> None:
        if self.observer is not None:
            self.observer.observe(event, rec, **data)

    # ---- views -------------------------------------------------------------------------------
    def live_models(self) -> dict[str, dict[str, Any]]:
        """Every model some live worker offers: merged info plus the workers offering it."""
        out: dict[str, dict[str, Any]] = {}
        for w in self.workers.values():
            for name, m in w.models.items():
                entry = out.setdefault(name, {**m, "workers": [], "slots_total": 0, "slots_free": 0, "awake": 0})
                entry["workers"].append(w.name)
                entry["awake"] += not w.asleep(name)  # loaded, not idle past its keep_alive
                entry["slots_total"] += int(m["slots"])
                entry["slots_free"] += w.free(name)
        return out

    def model_info(self, name: str) -> dict[str, Any] | None:
        for w in self.workers.values():
            if name in w.models:
                return w.models[name]
        return None

    def queue_depth(self) -> int:
        return sum(len(q) for q in self.queues.values())

    def completed_24h(self) -> int:
        cutoff = time.time() - 86400
        while self.completed and self.completed[0] < cutoff:
            self.completed.popleft()
        return len(self.completed)

    # ---- submission --------------------------------------------------------------------------
    async def resolve_model(self, op: str, model: str | None) -> str:
        """The model a job runs on; waits briefly for workers when none offers it yet."""
        # Real time, not ``clock``: this waits on the event loop, which runs on real time.
        deadline = time.monotonic() + self.worker_wait_s
        while True:
            name = model or self._default_model(op)
            if name and self._offered(name, op):
                return name
            if name and name in self.live_models():
                raise ApiError("not_supported", f"model '{name}' does not support '{op}'")
            # A model never seen while workers are up is unknown: fail fast. Otherwise wait a little for
            # workers (a router restart, a worker still loading) before answering 503.
            if self.workers and name and name not in self.known_models:
                raise ApiError("model_not_found", f"model '{name}' is not offered by any worker",
                               {"available": sorted(self.live_models())}, param="model")
            left = deadline - time.monotonic()
            if left <= 0:
                what = f"model '{name}'" if name else f"a model that serves '{op}'"
                raise ApiError("no_worker", f"no live worker offers {what}", headers={"Retry-After": "5"})
            self.mesh_changed.clear()
            try:
                await asyncio.wait_for(self.mesh_changed.wait(), left)
            except asyncio.TimeoutError:
                pass

    def _offered(self, name: str, op: str) -> bool:
        return any(name in w.models and op in w.models[name]["operations"] for w in self.workers.values())

    def _default_model(self, op: str) -> str | None:
        kind = "image" if op in protocol.IMAGE_OPERATIONS else "text"
        configured = self.default_models.get(kind)
        if configured:
            return configured
        if op not in self._defaults:  # forgotten whenever a worker joins, re-registers or leaves
            offered = sorted({n for w in self.workers.values() for n, m in w.models.items()
                              if op in m["operations"]})
            self._defaults[op] = offered[0] if offered else None
        return self._defaults[op]

    def submit(self, job: Job, *, tenant: str = "anonymous", priority: int = 0, weight: float = 1.0) -> JobRecord:
        """Accept a job whose model is resolved; dispatch it now or queue it (bounded). ``tenant`` (the token
        name), ``priority`` and ``weight`` place it in its model's queue (router/fairqueue.py)."""
        if not self.accepting:
            raise ApiError("shutting_down", "the router is shutting down", headers={"Retry-After": "5"})
        queue = self.queues[job.model]
        if len(queue) >= self.queue_max and not self._candidates(job):
            raise ApiError("queue_full", f"the queue for model '{job.model}' is full ({self.queue_max} jobs)",
                           {"queue_depth": len(queue)}, headers={"Retry-After": "2"})
        rec = JobRecord(job, self.clock, tenant=tenant, priority=priority, weight=weight)
        if self.affinity is not None:
            key = prompt_key(job.op, job.params)
            rec.prefixes = None if key is None else self.affinity.prefixes(job.model, key)
        self.jobs[job.id] = rec
        queue.append(rec)
        self._drain(job.model)
        return rec

    def cancel(self, rec: JobRecord, keep: bool = False) -> None:
        """The client went away (or asked to interrupt): stop the job wherever it is."""
        if rec.done:
            return
        self._observe("cancel", rec)
        queue = self.queues.get(rec.job.model)
        if queue and rec in queue:
            queue.remove(rec)
            self._finish(rec, "error", ApiError("cancelled", "cancelled"))
            return
        self._send_cancel(rec, keep)
        if not keep:
            self._finish(rec, "error", ApiError("cancelled", "cancelled"))

    def _send_cancel(self, rec: JobRecord, keep: bool = False) -> None:
        """Tell the worker running ``rec`` (if any) to stop it; ``keep``: return what is done (A1111 interrupt)."""
        if rec.worker is not None:
            frame = codec.encode(Command.CANCEL, messages.cancel(rec.job.id, rec.job.attempt, keep))
            self.send(rec.worker.identity, frame)

    # ---- dispatch ----------------------------------------------------------------------------
    def _candidates(self, job: Job) -> list[WorkerState]:
        """Workers that can take the job now; an exclusive job needs its model's every slot free."""
        return [w for w in self.workers.values()
                if not w.draining and job.model in w.models and job.op in w.models[job.model]["operations"]
                and w.free(job.model) >= (int(w.models[job.model]["slots"]) if job.exclusive else 1)]

    def _drain(self, model: str) -> None:
        queue = self.queues.get(model)
        while queue:
            head = queue.peek()
            assert isinstance(head, JobRecord)
            candidates = self._candidates(head.job)
            if not candidates:
                return
            rec, worker = self._place(model, queue, head, candidates)
            queue.take(rec)
            if rec.prefixes is not None and self.affinity is not None:
                self.affinity.record(model, rec.prefixes, worker.name)
            self._dispatch(rec, worker)

    @staticmethod
    def _load(w: WorkerState, model: str) -> float:
        return 1.0 - w.free(model) / max(1, int(w.models[model]["slots"]))

    def _least_loaded(self, model: str, candidates: list[WorkerState]) -> WorkerState:
        # A worker that has the model loaded before one where it sleeps (keep_alive), then least loaded first
        # (most free slots relative to size), then least recently used.
        return min(candidates, key=lambda w: (w.asleep(model), self._load(w, model), len(w.running),
                                              w.last_dispatch))

    def _cached_on(self, model: str, rec: JobRecord, candidates: list[WorkerState]) -> tuple[WorkerState | None, bool]:
        """(a free worker that holds the longest cached prefix of the job's prompt of all workers, if it is not
        much busier than the least loaded one; whether some worker holds a prefix of it at all)."""
        if rec.prefixes is None or self.affinity is None:
            return None, False
        matched = self.affinity.match(model, rec.prefixes)
        longest = max(matched.values(), default=0)
        if longest < self.affinity.block:
            return None, False
        holders = [w for w in candidates if matched.get(w.name, 0) == longest]
        if not holders:
            return None, True  # its cache is on a busy worker
        best = min(holders, key=lambda w: self._load(w, model))
        least = min(self._load(w, model) for w in candidates)
        balanced = self._load(best, model) - least <= self.affinity_imbalance
        return (best if balanced else None), True

    def _place(self, model: str, queue: FairQueue, head: JobRecord,
               candidates: list[WorkerState]) -> tuple[JobRecord, WorkerState]:
        """The job to run next and where (docs/protocol.md "Routing"): the head of the queue on the worker that
        has its prompt's prefix cached; when that worker is busy, a job a little further on whose cache is
        free (the head waits at most ``AFFINITY_SKIPS`` such turns); else the head on the least loaded."""
        cached, anywhere = self._cached_on(model, head, candidates)
        if cached is not None:
            return head, cached
        if anywhere and head.skipped < AFFINITY_SKIPS and not head.job.exclusive:
            for rec in itertools.islice(queue, 1, AFFINITY_WINDOW):
                assert isinstance(rec, JobRecord)
                if rec.job.exclusive or rec.prefixes is None:
                    continue
                able = [w for w in candidates if rec.job.op in w.models[model]["operations"]]
                worker = self._cached_on(model, rec, able)[0] if able else None
                if worker is not None:
                    head.skipped += 1
                    return rec, worker
        return head, self._least_loaded(model, candidates)

    def _dispatch(self, rec: JobRecord, worker: WorkerState) -> None:
        worker.seq += 1
        try:
            frame = codec.encode(Command.REQUEST, rec.job.to_wire(worker.seq))
        except Exception as exc:  # parameters msgpack cannot carry: the dialect let something odd through
            log.error("job %s cannot be encoded: %s", rec.job.id, exc)
            self._finish(rec, "error", ApiError("invalid_request", "the request cannot be sent to a worker"))
            return
        rec.worker = worker
        rec.last_activity = self.clock()
        rec.dispatch_seq = worker.seq
        slots = int(worker.models[rec.job.model]["slots"]) if rec.job.exclusive else 1
        worker.start_job((rec.job.id, rec.job.attempt), rec.job.model, slots)
        worker.last_dispatch = self.clock()
        self.send(worker.identity, frame)
        self._observe("dispatch", rec)

    def _finish(self, rec: JobRecord, kind: str, payload: Any) -> None:
        if rec.done:
            return
        rec.done = True
        outcome = "ok" if kind == "final" else getattr(payload, "code", "error")
        self._observe("end", rec, outcome=outcome, result=payload if kind == "final" else None)
        worker = rec.worker.name if rec.worker else "-"
        log.info("job %s %s on %s by %s (attempt %d): %s in %.3fs", rec.job.id, rec.job.op, rec.job.model, worker,
                 rec.job.attempt, outcome, time.time() - rec.created,
                 extra={"job": rec.job.id, "worker": worker})
        self.jobs.pop(rec.job.id, None)
        if kind == "final":
            self.completed.append(time.time())
        rec.events.put_nowait((kind, payload))

    def _refused(self, rec: JobRecord, worker: WorkerState) -> None:
        """The worker had no room (another router took its slot, or its backend restarts): not a failure of
        the job; it goes back to the head of the queue, and that worker counts as full until it beats again."""
        job = rec.job
        rec.worker = None
        rec.refusals += 1
        if rec.refusals > MAX_REFUSALS:
            self._finish(rec, "error", ApiError("busy", f"no worker had room for the job after {MAX_REFUSALS} tries",
                                                headers={"Retry-After": "1"}))
            return
        job.attempt += 1  # a new attempt number: anything late from the refusing worker is dropped
        if not self._offered(job.model, job.op):  # its model was unloaded meanwhile, from every worker
            self._finish(rec, "error", ApiError("no_worker", f"no live worker offers model '{job.model}' any more",
                                                headers={"Retry-After": "5"}))
            return
        log.info("job %s: worker %s had no room; queued again as attempt %d", job.id, worker.name, job.attempt)
        self.queues[job.model].appendleft(rec)
        self._drain(job.model)

    def _fail_over(self, rec: JobRecord, reason: str) -> None:
        """Run the job again on another worker (docs/protocol.md, "Failover")."""
        if rec.done:
            return
        job = rec.job
        rec.worker = None
        rec.failovers += 1
        self._observe("failover", rec)
        if job.attempt - rec.refusals >= MAX_ATTEMPTS:
            self._finish(rec, "error", ApiError("no_worker", f"job failed {job.attempt} times ({reason})"))
            return
        job.attempt += 1
        if isinstance(job.params, TextParams) and rec.visible:
            job.params.resume_text = rec.text_so_far
            budget = job.params.max_tokens
            if budget > 0:
                job.params.max_tokens = budget - (rec.tokens_so_far - rec.tokens_resumed)
                rec.tokens_resumed = rec.tokens_so_far
                if job.params.max_tokens <= 0:
                    self._finish(rec, "final", to_wire(TextResult(finish_reason="length", stop_type="limit",
                                                                   completion_tokens=rec.tokens_so_far)))
                    return
        rec.progress = {}
        log.warning("job %s: %s; re-dispatching as attempt %d", job.id, reason, job.attempt)
        if not self._offered(job.model, job.op):
            self._finish(rec, "error", ApiError("no_worker", f"no live worker offers model '{job.model}' "
                                                             f"after {reason}", headers={"Retry-After": "5"}))
            return
        self.queues[job.model].appendleft(rec)
        self._drain(job.model)

    # ---- frames from workers -----------------------------------------------------------------
    def process_worker(self, identity: bytes, frame: bytes) -> None:
        try:
            command, body = codec.decode(frame)
        except codec.DecodeError as exc:
            log.warning("dropping a bad frame from %r: %s", identity[:32], exc)
            return
        worker = self.workers.get(identity)
        if worker is not None:
            worker.last_seen = self.clock()
        if command == Command.READY:
            self._process_ready(identity, body)
            return
        if worker is None:
            if command != Command.DISCONNECT:
                self.send(identity, codec.encode(Command.DISCONNECT, messages.disconnect(protocol.REASON_UNKNOWN)))
            return
        if command == Command.HEARTBEAT:
            if "memory_free_mb" in body:
                worker.caps["memory_free_mb"] = body["memory_free_mb"]
            worker.draining = bool(body.get("draining"))
            if "backends" in body:
                was = {m for m in worker.models if worker.available(m)}
                worker.update_backends(body["backends"])
                for model in worker.models:
                    if worker.available(model) and model not in was:
                        self._drain(model)  # a backend process is back after a restart
            progress = body.get("progress")
            if isinstance(progress, dict):
                self._note_progress(worker, progress)
            if isinstance(body.get("jobs"), list) and isinstance(body.get("seen"), int):
                listed = set(map(str, body["jobs"]))
                if isinstance(body.get("load"), dict):
                    before = {m: worker.free(m) for m in worker.models}
                    worker.note_load(body["load"], listed)
                    for model, free in before.items():
                        if worker.free(model) > free:
                            self._drain(model)  # another router's jobs ended there
                self._reconcile(worker, listed, body["seen"])
        elif command in (Command.PARTIAL, Command.FINAL, Command.ERROR):
            self._process_job_message(worker, command, body)
        elif command == Command.DISCONNECT:
            self._remove_worker(worker, "it left")
        elif command == Command.REPLY:
            entry = self.replies.pop(str(body.get("id")), None)
            if entry is not None and not entry[1].done():
                entry[1].set_result(body)
        else:
            log.warning("worker %s sent unexpected %s", worker.name, command.name)

    # ---- models at run time (router/admin_routes.py) -------------------------------------------
    def command_worker(self, worker: WorkerState, command: Command, body: dict[str, Any]) -> asyncio.Future:
        """Send LOAD, UNLOAD or UPDATE (``body["id"]`` unique); the future gets the worker's REPLY body, or a
        REPLY made here when the worker goes away first."""
        future = asyncio.get_running_loop().create_future()
        self.replies[str(body["id"])] = (worker.identity, future)
        self.send(worker.identity, codec.encode(command, body))
        return future

    def _models_gone(self, worker: WorkerState, gone: set[str]) -> None:
        """A worker announced itself again without these models (unloaded at run time). A model no live worker
        offers any more is unknown from now on (404), and the jobs waiting for it end (503)."""
        for model in gone:
            log.info("worker %s no longer serves %s", worker.name, model)
            if any(model in w.models for w in self.workers.values()):
                continue
            self.known_models.discard(model)
            queue = self.queues.get(model)
            if queue is None:
                continue
            for rec in list(queue):
                assert isinstance(rec, JobRecord)
                queue.remove(rec)
                self._finish(rec, "error", ApiError("no_worker", f"model '{model}' was unloaded and no live worker "
                                                                 "offers it", headers={"Retry-After": "5"}))

    def _process_ready(self, identity: bytes, body: dict[str, Any]) -> None:
        version = body.get("version")
        name = body.get("worker")
        if not protocol.compatible(version):
            log.error("refusing worker %r: it speaks mesh protocol %r, this router speaks %s",
                      name, version, protocol.VERSION)
            self.send(identity, codec.encode(Command.DISCONNECT, messages.disconnect(
                protocol.REASON_VERSION, f"router speaks mesh protocol {protocol.VERSION}, worker sent {version}")))
            return
        worker = self.workers.get(identity)
        gone: set[str] = set()
        if worker is None:
            worker = WorkerState(identity, body, self.clock)
            self.workers[identity] = worker
            log.info("worker %s joined: %s", worker.name, ", ".join(sorted(worker.models)) or "no models")
        else:  # announced again: its models changed (docs/protocol.md "Models at run time")
            before = set(worker.models)
            worker.update(body.get("capabilities") or {})
            gone = before - set(worker.models)
            added = set(worker.models) - before
            if added:
                log.info("worker %s now serves %s", worker.name, ", ".join(sorted(added)))
        # Jobs the worker still runs from before (a router restart) occupy its slots until they end.
        ours = {job_id for job_id, _attempt in worker.running}
        for job_id, model in (body.get("running") or {}).items():
            if isinstance(model, str) and model in worker.models and job_id not in ours:
                worker.start_job((job_id, 0), model)
        self.known_models.update(worker.models)
        self._defaults.clear()
        self.send(identity, codec.encode(Command.WELCOME, messages.welcome(self.router_name, self.heartbeat_ms,
                                                                            self.liveness)))
        self.mesh_changed.set()
        self._models_gone(worker, gone)
        for model in worker.models:
            self._drain(model)

    def _process_job_message(self, worker: WorkerState, command: Command, body: dict[str, Any]) -> None:
        job_id, attempt = str(body.get("job")), body.get("attempt")
        if not isinstance(attempt, int):
            attempt = -1  # none sent: it matches no job this worker runs, nor any record's attempt
        key = (job_id, attempt)
        if command != Command.PARTIAL:
            model = worker.end_job(key) or worker.end_job((job_id, 0))
            if model is not None:
                if command == Command.ERROR and body.get("code") == "busy":
                    worker.refused(model)  # it has no room: full until it beats again (Scheduler._refused)
                else:
                    worker.jobs_done += 1
                self._drain(model)
        rec = self.jobs.get(job_id)
        if rec is None or rec.job.attempt != attempt or rec.worker is not worker:
            return  # a late message from an attempt the router gave up on
        rec.last_activity = self.clock()
        if command == Command.PARTIAL:
            chunks = body.get("chunks")  # the pieces, in order (a fast stream sends several in one frame)
            for chunk in chunks if isinstance(chunks, list) else ():
                if not isinstance(chunk, dict):
                    continue
                if "text" in chunk:
                    if not rec.text_so_far:
                        self._observe("first_token", rec)
                    rec.text_so_far += str(chunk["text"])
                    rec.tokens_so_far += max(1, len(chunk.get("tokens") or ()))
                if "step" in chunk:
                    rec.progress = chunk
                    self._observe("step", rec)
                rec.events.put_nowait(("partial", chunk))
        elif command == Command.FINAL:
            self._finish(rec, "final", body.get("result") or {})
        else:
            code = str(body.get("code") or "internal_error")
            if code == "busy":
                self._refused(rec, worker)
                return
            if code == "backend_restarted":  # stopped for another job's sake: no blame
                self._fail_over(rec, f"the backend of worker {worker.name} was restarted")
                return
            if code == "backend_crashed":
                self._crashed(rec, worker, body)
                return
            self._finish(rec, "error", ApiError(code, str(body.get("message") or code), body.get("details")))

    def _crashed(self, rec: JobRecord, worker: WorkerState, body: dict[str, Any]) -> None:
        """A backend process died while running the job (docs/protocol.md "Crashes"). A job that was alone in
        it is to blame: after ``job_crash_limit`` such crashes it ends with ``job_crashed_backend`` and is
        not retried. A job that shared the crash with others is retried alone (exclusive), so that a second
        crash is its own."""
        details = body.get("details")
        if not isinstance(details, dict):
            details = {}
        alone = bool(details.get("alone"))
        reason = str(details.get("reason") or "crashed")
        if alone:
            rec.crashes += 1
        else:
            rec.shared_crashes += 1
            rec.job.exclusive = True
        self._observe("crash", rec, worker=worker.name)
        log.error("job %s crashed the backend of %s on worker %s (%s; %s; params %s)", rec.job.id, rec.job.model,
                  worker.name, reason, "alone in it" if alone else f"with {details.get('jobs', '?')} jobs in it",
                  params_digest(rec.job), extra={"job": rec.job.id, "worker": worker.name})
        if rec.crashes >= self.job_crash_limit or rec.shared_crashes >= SHARED_CRASH_LIMIT:
            crashes = rec.crashes + rec.shared_crashes
            self._finish(rec, "error", ApiError(
                "job_crashed_backend",
                f"this request crashed the backend of model '{rec.job.model}' ({reason}); it was stopped after "
                f"{crashes} crash{'es' if crashes > 1 else ''} and is not retried",
                {"worker": worker.name, "reason": reason, "crashes": crashes}))
            return
        self._fail_over(rec, f"the backend of worker {worker.name} {reason}")

    def _note_progress(self, worker: WorkerState, progress: dict[str, Any]) -> None:
        """A job whose progress counter moved since the last heartbeat is not stuck."""
        for job_id, count in progress.items():
            rec = self.jobs.get(job_id)
            if rec is not None and rec.worker is worker and count != rec.progress_count:
                rec.progress_count = count
                rec.last_activity = self.clock()

    def _reconcile(self, worker: WorkerState, known: set[str], seen: int) -> None:
        """A job the worker does not list in a heartbeat sent after it received a later REQUEST (``seen``
        echoes the highest REQUEST sequence number it got) was lost or forgotten: run it elsewhere now
        instead of waiting for the stall timeout. Jobs dispatched after ``seen`` may still be in flight."""
        for job_id, attempt in list(worker.running):
            rec = self.jobs.get(job_id)
            if job_id in known or rec is None or rec.worker is not worker or rec.dispatch_seq > seen:
                continue
            model = worker.end_job((job_id, attempt))
            self._fail_over(rec, f"worker {worker.name} does not know the job")
            if model is not None:
                self._drain(model)  # the freed slot, when the job ended instead of running again

    def _remove_worker(self, worker: WorkerState, why: str) -> None:
        if self.workers.pop(worker.identity, None) is None:
            return
        log.warning("worker %s removed: %s (%d job(s) in flight)", worker.name, why, len(worker.running))
        self._defaults.clear()
        if self.affinity is not None and not any(w.name == worker.name for w in self.workers.values()):
            self.affinity.drop_worker(worker.name)
        self.mesh_changed.set()
        for job_id, _attempt in list(worker.running):
            rec = self.jobs.get(job_id)
            if rec is not None and rec.worker is worker:
                self._fail_over(rec, f"worker {worker.name} {why}")
        worker.clear_jobs()
        for request_id, (identity, future) in list(self.replies.items()):
            if identity == worker.identity:
                del self.replies[request_id]
                if not future.done():
                    future.set_result(messages.reply(request_id, code="no_worker",
                                                     message=f"worker {worker.name} {why} before it answered"))

    # ---- timers ------------------------------------------------------------------------------
    def tick(self) -> None:
        """Purge expired workers and stalled jobs; called several times per heartbeat interval."""
        now = self.clock()
        expiry = self.heartbeat_ms * self.liveness / 1000
        for worker in list(self.workers.values()):
            if now - worker.last_seen > expiry:
                self._remove_worker(worker, f"missed heartbeats for {now - worker.last_seen:.1f}s")
        for rec in list(self.jobs.values()):
            if rec.worker is not None and now - rec.last_activity > self.job_stall_s:
                stuck = rec.worker
                self._send_cancel(rec)
                self._fail_over(rec, f"no progress on worker {stuck.name} for {self.job_stall_s:.0f}s")

    def heartbeat(self) -> None:
        frame = codec.encode(Command.HEARTBEAT)
        for identity in list(self.workers):
            self.send(identity, frame)

    def abort_all(self, err: ApiError) -> None:
        """End every job still open with ``err`` (router shutdown after its drain time)."""
        for rec in list(self.jobs.values()):
            self._send_cancel(rec)
            self._finish(rec, "error", err)
        for queue in self.queues.values():
            queue.clear()

    def shutdown(self) -> None:
        self.accepting = False
        frame = codec.encode(Command.DISCONNECT, messages.disconnect(protocol.REASON_SHUTDOWN))
        for identity in list(self.workers):
            self.send(identity, frame)
