"""Run a backend in-process, the way a backend process runs it, without a router or a worker.

```python
from velesio.testing import run_backend

run = run_backend(EchoBackend, {"op": "completion", "params": {"prompt": "a b c", "stop": ["a"]}})
assert run.ok and run.text == "c b " and run.result.stopping_word == "a"
```

The params are a map of fields, which get the mesh's defaults (velesio.mesh.params) as a router's would, or a
typed params object. What the backend process applies is applied here too: the result and every chunk cross
msgpack (what the router receives: tuples become lists), a result that is not the type of its operation is
an ``internal_error``, and an exception ends the job with the error code the router would see
(``reported_code``: a ``BackendError`` code outside ``ERROR_CODES``, or any other exception, becomes
``internal_error``, with a warning). ``run()`` is called in the calling thread.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import msgpack

from velesio.backends import Backend, BackendError, JobContext, ModelConfig, reported_code
from velesio.mesh.jobs import Job
from velesio.mesh.params import PARAMS_BY_OP, RESULT_BY_OP, Params, Result, params_from_wire, result_from_wire, to_wire
from velesio.mesh.protocol import ERROR_CODES

__all__ = ["BackendRun", "load_backend", "run_backend"]

log = logging.getLogger("velesio.testing")


@dataclasses.dataclass
class BackendRun:
    """What one job did: its chunks, and its result or its error."""

    job: Job
    chunks: list[dict[str, Any]]  # everything ``ctx.emit`` / ``ctx.progress`` sent, in order, as the router gets it
    result: Result | None  # what ``run()`` returned, as the router reads it (after msgpack); None when it failed
    error: BaseException | None = None  # what ``run()`` raised
    code: str | None = None  # the error code the router receives (None when the job succeeded)
    message: str | None = None  # the error message the router receives
    cancelled: bool = False  # whether the job was cancelled (``cancel_after``)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def text(self) -> str:
        """The text streamed: the concatenated ``text`` of the chunks."""
        return "".join(str(c["text"]) for c in self.chunks if "text" in c)

    @property
    def tokens(self) -> list[Any]:
        """The token ids the chunks carried (what the router counts for failover)."""
        return [t for c in self.chunks for t in (c.get("tokens") or ())]


def _wire(value: Any) -> Any:
    """``value`` as the other end of the pipe reads it; raises TypeError / ValueError when msgpack cannot carry it."""
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False, strict_map_key=False)


def load_backend(backend: type[Backend], config: ModelConfig | None = None) -> tuple[Backend, dict[str, Any]]:
    """Instantiate ``backend`` and call ``load()`` once: ``(instance, metadata)``. Without ``config``, the
    backend's first embedded model, else a model named after the backend with no path and no options."""
    if config is None:
        embedded = backend.embedded_models()
        config = embedded[0] if embedded else ModelConfig(name=f"{backend.name}-test", backend=backend.name)
    instance = backend(config)
    return instance, dict(instance.load() or {})


def _params(op: str, params: Params | dict[str, Any] | None) -> Params:
    """The typed params of ``op``: ``params`` itself, or built from a map of fields with the mesh's defaults
    for the others (as a router sends them). A field the op's params do not have is an error here (a typo in a
    test), where the wire drops it."""
    cls = PARAMS_BY_OP.get(op)
    if cls is None:
        raise ValueError(f"unknown operation {op!r} (one of {', '.join(PARAMS_BY_OP)})")
    if params is None or isinstance(params, dict):
        fields = dict(params or {})
        unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"{cls.__name__} has no field {', '.join(map(repr, unknown))}")
        return params_from_wire(op, fields)
    if not isinstance(params, cls):
        raise TypeError(f"operation {op!r} takes {cls.__name__}, not {type(params).__name__}")
    return params


def _job(job: Job | dict[str, Any], model: str) -> Job:
    if isinstance(job, Job):
        return job
    op = str(job.get("op") or "completion")
    return Job(op=op, model=str(job.get("model") or model), params=_params(op, job.get("params")),
               stream=bool(job.get("stream", True)))


def run_backend(backend: Backend | type[Backend], job: Job | dict[str, Any], *, config: ModelConfig | None = None,
                cancel_after: int | None = None, keep_partial: bool = False) -> BackendRun:
    """Run one job on ``backend`` and return what it streamed and returned (or raised).

    - ``backend``: a loaded instance, or a class, which is instantiated with ``config`` (see ``load_backend``)
      and loaded once.
    - ``job``: a ``Job``, or a dict ``{"op", "params", "model"?, "stream"?}`` whose ``params`` are the op's typed
      params (``TextParams``, ...) or a dict of their fields, the others getting the mesh's defaults as a router
      sends them (so ``max_tokens`` is 150 unless given); ``stream`` defaults to true.
    - ``cancel_after``: cancel the job (``ctx.cancel(keep_partial)``) once that many text chunks were emitted,
      as the worker does when the client goes away; 0 cancels it before ``run()`` starts.
    """
    if isinstance(backend, type):
        backend, _ = load_backend(backend, config)
    the_job = _job(job, backend.config.name)
    chunks: list[dict[str, Any]] = []

    def emit(chunk: dict[str, Any]) -> None:
        chunks.append(_wire(chunk))
        if cancel_after is not None and sum("text" in c for c in chunks) >= cancel_after:
            ctx.cancel(keep_partial)

    ctx = JobContext(the_job, emit)
    if cancel_after is not None and cancel_after <= 0:
        ctx.cancel(keep_partial)
    try:
        result = backend.run(the_job, ctx)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the job's error, as in a backend process
        code = reported_code(exc)
        if isinstance(exc, BackendError):
            message = str(exc) or code
            if code != exc.code:
                log.warning("backend %s raised %s with error code %r, which is not one of %s; reported as "
                            "internal_error", backend.name, type(exc).__name__, exc.code, ", ".join(ERROR_CODES))
        else:
            message = f"the backend failed: {type(exc).__name__}: {exc}"
        return BackendRun(the_job, chunks, None, exc, code, message, cancelled=ctx.cancelled)
    expected = RESULT_BY_OP.get(the_job.op)
    if expected is None or not isinstance(result, expected):  # a backend bug: the router reads each op's type
        wanted = expected.__name__ if expected is not None else "result of a known operation"
        log.warning("backend %s returned %s for %s, not a %s; reported as internal_error", backend.name,
                    type(result).__name__, the_job.op, wanted)
        return BackendRun(the_job, chunks, None, TypeError(f"{type(result).__name__} is not a {wanted}"),
                          "internal_error", f"the backend of model {backend.config.name} returned a "
                          f"{type(result).__name__}, not a {wanted}", cancelled=ctx.cancelled)
    try:
        return BackendRun(the_job, chunks, result_from_wire(the_job.op, _wire(to_wire(result))),
                          cancelled=ctx.cancelled)
    except (TypeError, ValueError) as exc:  # a result msgpack cannot carry (a backend bug)
        return BackendRun(the_job, chunks, None, exc, "internal_error",
                          f"the backend of model {backend.config.name} returned an unsendable result",
                          cancelled=ctx.cancelled)
