"""The mesh messages' bodies (docs/protocol.md): one ``TypedDict`` per command body and one constructor per
message. Every sender builds its bodies here, so that no body is written as a dict literal anywhere else and
a key cannot be misspelt on one side only.

Why ``TypedDict``: it costs nothing at run time. A constructor returns a plain dict, which msgpack packs as
it is, and a received body is the plain dict msgpack made. The stream relay sends tens of thousands of
frames a second; a dataclass or Struct per frame (built, then turned into a dict to pack, or built from one
on receipt) would be measurable. The types are for mypy only, so a reader still checks what it uses of a
received body (a peer may send anything).

The constants (command values, version, error codes, reasons) are in ``protocol.py``."""

from __future__ import annotations

from typing import Any, TypedDict

from . import protocol


class _BackendStatus(TypedDict):
    state: str  # "ready" | "restarting" | "failed" | "loading" | "sleeping" | "draining"
    pid: int | None
    crashes: int
    restarts: int
    last_crash: str | None
    memory_mb: int | None
    memory_limit_mb: int | None
    max_job_s: float | None


class BackendStatus(_BackendStatus, total=False):
    """One model's backend process, in ``backends`` (READY's capabilities and worker HEARTBEAT). 2.1 adds the
    model's run-time settings: its memory estimate, its ``keep_alive`` and how long it has been idle."""

    size_mb: int | None
    keep_alive_s: float | None
    idle_s: float


class Ready(TypedDict):
    version: str
    worker: str
    capabilities: dict[str, Any]
    running: dict[str, str]  # job id -> model, jobs still running from before a reconnect


class Welcome(TypedDict):
    version: str
    router: str
    heartbeat_ms: int
    liveness: int


class WorkerHeartbeat(TypedDict, total=False):
    """Worker -> router HEARTBEAT (every key optional: a bare one is a sign of life). Router -> worker: ``{}``."""

    load: dict[str, int]
    jobs: list[str]
    progress: dict[str, int]
    seen: int
    backends: dict[str, BackendStatus]
    draining: bool
    memory_free_mb: int


class _Request(TypedDict):
    id: str
    attempt: int
    op: str
    model: str
    stream: bool
    params: dict[str, Any]


class Request(_Request, total=False):
    seq: int
    exclusive: bool


class Partial(TypedDict):
    job: str
    attempt: int
    chunks: list[dict[str, Any]]  # always a list, even of one piece


class Final(TypedDict):
    job: str
    attempt: int
    result: Any


class _Error(TypedDict):
    job: str
    attempt: int
    code: str  # protocol.ERROR_CODES or protocol.MESH_ERROR_CODES
    message: str


class Error(_Error, total=False):
    details: dict[str, Any]


class _Cancel(TypedDict):
    job: str
    attempt: int


class Cancel(_Cancel, total=False):
    keep: bool


class _Disconnect(TypedDict):
    reason: str  # protocol.REASON_*


class Disconnect(_Disconnect, total=False):
    version: str
    message: str


class Load(TypedDict):
    """Router -> worker LOAD: start a backend process for a new model."""

    id: str
    model: dict[str, Any]  # a model entry, as in mesh.yaml's worker.models (docs/protocol.md)


class Unload(TypedDict):
    """Router -> worker UNLOAD: stop serving a model (its jobs finish first, or ``move`` them)."""

    id: str
    model: str
    move: bool


class _Update(TypedDict):
    id: str
    model: str


class Update(_Update, total=False):
    """Router -> worker UPDATE: change a model's ``slots`` or ``keep_alive`` (a key left out is unchanged)."""

    slots: int
    keep_alive: float | None


class _Reply(TypedDict):
    id: str
    ok: bool


class Reply(_Reply, total=False):
    """Worker -> router REPLY to LOAD, UNLOAD or UPDATE: ``ok``, else ``code`` and ``message``."""

    code: str  # protocol.REPLY_CODES
    message: str
    details: dict[str, Any]
    model: dict[str, Any]  # the model's advert after the change (LOAD, UPDATE)
    moved: int  # UNLOAD with move: the jobs handed back to their routers


# ---- constructors ------------------------------------------------------------------------------------
def backend_status(state: str, pid: int | None, crashes: int, restarts: int, last_crash: str | None,
                   memory_mb: int | None, memory_limit_mb: int | None, max_job_s: float | None) -> BackendStatus:
    return {"state": state, "pid": pid, "crashes": crashes, "restarts": restarts, "last_crash": last_crash,
            "memory_mb": memory_mb, "memory_limit_mb": memory_limit_mb, "max_job_s": max_job_s}


def load(request_id: str, model: dict[str, Any]) -> Load:
    return {"id": request_id, "model": model}


def unload(request_id: str, model: str, move: bool = False) -> Unload:
    return {"id": request_id, "model": model, "move": move}


def update(request_id: str, model: str, *, slots: int | None = None, keep_alive: float | None = None,
           set_keep_alive: bool = False) -> Update:
    """UPDATE with ``slots`` when given, and ``keep_alive`` when ``set_keep_alive`` (None: never idle-unload)."""
    body: Update = {"id": request_id, "model": model}
    if slots is not None:
        body["slots"] = slots
    if set_keep_alive:
        body["keep_alive"] = keep_alive
    return body


def reply(request_id: str, *, code: str | None = None, message: str | None = None,
          details: dict[str, Any] | None = None, model: dict[str, Any] | None = None,
          moved: int | None = None) -> Reply:
    """REPLY: ``ok`` unless a ``code`` (protocol.REPLY_CODES) says why not."""
    body: Reply = {"id": request_id, "ok": code is None}
    if code is not None:
        body["code"] = code
        body["message"] = message or code
    if details is not None:
        body["details"] = details
    if model is not None:
        body["model"] = model
    if moved is not None:
        body["moved"] = moved
    return body


def ready(worker: str, capabilities: dict[str, Any], running: dict[str, str] | None = None,
          version: str = protocol.VERSION) -> Ready:
    return {"version": version, "worker": worker, "capabilities": capabilities, "running": running or {}}


def welcome(router: str, heartbeat_ms: int, liveness: int) -> Welcome:
    return {"version": protocol.VERSION, "router": router, "heartbeat_ms": heartbeat_ms, "liveness": liveness}


def worker_heartbeat(*, load: dict[str, int] | None = None, jobs: list[str] | None = None,
                     progress: dict[str, int] | None = None, seen: int | None = None,
                     backends: dict[str, BackendStatus] | None = None, draining: bool | None = None,
                     memory_free_mb: int | None = None) -> WorkerHeartbeat:
    """A worker's HEARTBEAT with the fields given (None: left out)."""
    body: WorkerHeartbeat = {}
    if load is not None:
        body["load"] = load
    if jobs is not None:
        body["jobs"] = jobs
    if progress is not None:
        body["progress"] = progress
    if seen is not None:
        body["seen"] = seen
    if backends is not None:
        body["backends"] = backends
    if draining is not None:
        body["draining"] = draining
    if memory_free_mb is not None:
        body["memory_free_mb"] = memory_free_mb
    return body


def request(job_id: str, attempt: int, op: str, model: str, stream: bool, params: dict[str, Any], *,
            exclusive: bool = False, seq: int | None = None) -> Request:
    body: Request = {"id": job_id, "attempt": attempt, "op": op, "model": model, "stream": stream,
                     "params": params}
    if exclusive:
        body["exclusive"] = True
    if seq is not None:
        body["seq"] = seq
    return body


def partial(job_id: str, attempt: int, chunks: list[dict[str, Any]]) -> Partial:
    return {"job": job_id, "attempt": attempt, "chunks": chunks}


def final(job_id: str, attempt: int, result: Any) -> Final:
    return {"job": job_id, "attempt": attempt, "result": result}


def error(job_id: str, attempt: int, code: str, message: str, details: dict[str, Any] | None = None) -> Error:
    body: Error = {"job": job_id, "attempt": attempt, "code": code, "message": message}
    if details is not None:
        body["details"] = details
    return body


def cancel(job_id: str, attempt: int, keep: bool = False) -> Cancel:
    return {"job": job_id, "attempt": attempt, "keep": keep}


def disconnect(reason: str, message: str | None = None) -> Disconnect:
    """DISCONNECT; a ``version`` refusal also carries our VERSION and ``message``."""
    body: Disconnect = {"reason": reason}
    if reason == protocol.REASON_VERSION:
        body["version"] = protocol.VERSION
    if message is not None:
        body["message"] = message
    return body
