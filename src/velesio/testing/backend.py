"""Run a backend in-process, the way a backend process runs it, without a router or a worker.

```python
from velesio.testing import run_backend

run = run_backend(EchoBackend, {"op": "completion", "params": {"prompt": "a b c", "stop": ["a"]}})
assert run.ok and run.text == "c b " and run.result["stopping_word"] == "a"
```

What the backend process applies is applied here too: the result and every chunk cross msgpack (what the
router receives: tuples become lists), and an exception ends the job with the error code the router would
see (``reported_code``: a ``BackendError`` code outside ``ERROR_CODES``, or any other exception, becomes
``internal_error``, with a warning). ``run()`` is called in the calling thread.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import msgpack

from velesio.backends import Backend, BackendError, JobContext, ModelConfig, reported_code
from velesio.mesh.jobs import TEXT_DEFAULTS, Job
from velesio.mesh.protocol import ERROR_CODES

__all__ = ["BackendRun", "load_backend", "run_backend"]

log = logging.getLogger("velesio.testing")

TEXT_GENERATION = ("completion", "chat")


@dataclasses.dataclass
class BackendRun:
    """What one job did: its chunks, and its result or its error."""

    job: Job
    chunks: list[dict[str, Any]]  # everything ``ctx.emit`` / ``ctx.progress`` sent, in order, as the router gets it
    result: dict[str, Any] | None  # what ``run()`` returned (after msgpack); None when it raised
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


def _job(job: Job | dict[str, Any], model: str) -> Job:
    if isinstance(job, Job):
        return job
    op = str(job.get("op") or "completion")
    params = dict(job.get("params") or {})
    if op in TEXT_GENERATION:  # the router fills every text parameter, its defaults where a client set none
        params = {**TEXT_DEFAULTS, **params}
    return Job(op=op, model=str(job.get("model") or model), params=params, stream=bool(job.get("stream", True)))


def run_backend(backend: Backend | type[Backend], job: Job | dict[str, Any], *, config: ModelConfig | None = None,
                cancel_after: int | None = None, keep_partial: bool = False) -> BackendRun:
    """Run one job on ``backend`` and return what it streamed and returned (or raised).

    - ``backend``: a loaded instance, or a class, which is instantiated with ``config`` (see ``load_backend``)
      and loaded once.
    - ``job``: a ``Job``, or a dict ``{"op", "params", "model"?, "stream"?}``; for ``completion`` and ``chat``
      the params get ``TEXT_DEFAULTS`` where unset, as the router's would; ``stream`` defaults to true.
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
    try:
        return BackendRun(the_job, chunks, _wire(result), cancelled=ctx.cancelled)
    except (TypeError, ValueError) as exc:  # a result msgpack cannot carry (a backend bug)
        return BackendRun(the_job, chunks, None, exc, "internal_error",
                          f"the backend of model {backend.config.name} returned an unsendable result",
                          cancelled=ctx.cancelled)
