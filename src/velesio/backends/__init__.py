"""The backend interface: the stable module third-party backends import (``velesio.backends``).

A backend is a class registered in the ``velesio.backends`` entry-point group. The worker makes one
instance per configured model, calls ``load()`` once, then ``run(job, ctx)`` for each job, in a thread of
its own (never on the event loop), at most ``slots`` at a time. See docs/plugins.md for the full contract.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from velesio.mesh.jobs import Job
from velesio.mesh.limits import IMAGE_LIMITS, ParamError, check_image, image_limits
from velesio.mesh.params import (
    DetokenizeParams,
    DetokenizeResult,
    EmbeddingsParams,
    EmbeddingsResult,
    ImageParams,
    ImageResult,
    Params,
    Result,
    TemplateParams,
    TemplateResult,
    TextParams,
    TextResult,
    TokenizeParams,
    TokenizeResult,
)
from velesio.mesh.protocol import ERROR_CODES

__all__ = [
    "API_VERSION",
    "ERROR_CODES",
    "IMAGE_LIMITS",
    "Backend",
    "BackendError",
    "Cancelled",
    "ContextExceeded",
    "DetokenizeParams",
    "DetokenizeResult",
    "EmbeddingsParams",
    "EmbeddingsResult",
    "ImageParams",
    "ImageResult",
    "InvalidRequest",
    "Job",
    "JobContext",
    "ModelConfig",
    "NotSupported",
    "ParamError",
    "Params",
    "Result",
    "StopMatcher",
    "TemplateParams",
    "TemplateResult",
    "TextParams",
    "TextResult",
    "TokenizeParams",
    "TokenizeResult",
    "check_image",
    "image_limits",
    "render_plain_chat",
]

# 2: ``job.params`` is a typed object (velesio.mesh.params) and ``run`` returns a typed result.
API_VERSION = 2


@dataclasses.dataclass
class ModelConfig:
    """One model entry of mesh.yaml: ``{name, backend, path, slots, options}``, and what the worker adds."""

    name: str
    backend: str
    path: str | None = None
    slots: int = 1
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    # CPU threads the worker gives this model (its share of the host's cores, see worker/cpu.py); None: the
    # backend's own default. A thread count in ``options`` is the operator's and wins over it.
    threads: int | None = None


class BackendError(Exception):
    """An error a client may see. ``code`` is one of ``ERROR_CODES`` (velesio.mesh.protocol); a backend process
    reports any other code as ``internal_error``, with a warning in its log."""

    code = "internal_error"


class InvalidRequest(BackendError):
    code = "invalid_request"


class NotSupported(BackendError):
    code = "not_supported"


class ContextExceeded(BackendError):
    code = "context_exceeded"


class Cancelled(BackendError):
    code = "cancelled"


def reported_code(exc: BaseException) -> str:
    """The error code a job ends with when ``run()`` raises ``exc``: a ``BackendError``'s ``code`` when it is
    one of ``ERROR_CODES``, else ``internal_error`` (what worker/runner.py and velesio.testing apply)."""
    code = exc.code if isinstance(exc, BackendError) else None
    return code if isinstance(code, str) and code in ERROR_CODES else "internal_error"


class JobContext:
    """What a running job can do besides returning its result. Thread-safe."""

    def __init__(self, job: Job, emit: Callable[[dict[str, Any]], None]):
        self.job = job
        self._emit = emit
        self._cancelled = False  # one attribute, set by the event loop and read by the job thread
        self.keep_partial = False  # set by an interrupt that wants what is done so far (A1111)
        self.progress_n = 0  # pieces emitted so far; heartbeats report it so the router sees progress

    def emit(self, chunk: dict[str, Any]) -> None:
        """Stream a partial result: ``{"text": piece, "tokens": [ids]}`` for text jobs. Call it for every
        piece even when the job does not stream: the worker forwards pieces only for streaming jobs, and
        counts every call as progress (a job without progress for ``job_stall_s`` is moved elsewhere)."""
        self._emit(chunk)

    def progress(self, step: int, steps: int, **extra: Any) -> None:
        """Report progress of a long job (image steps); shown by /sdapi/v1/progress."""
        self._emit({"step": step, "steps": steps, **extra})

    def cancel(self, keep_partial: bool = False) -> None:
        self.keep_partial = self.keep_partial or keep_partial
        self._cancelled = True

    @property
    def cancelled(self) -> bool:
        """Check between tokens or steps; stop early when true."""
        return self._cancelled


class Backend(abc.ABC):
    """Base class of every backend, built-in or plugin.

    Class attributes declare what the backend is; the worker advertises them to the router, which routes
    on ``operations`` and model names only.

    CPU threads: a backend that computes on the CPU uses ``config.threads`` threads when it is set (unless
    its options fix a count), and implements ``set_threads`` so that the worker can change that count while
    it runs: workers on one host share its cores, and each one's share changes when another joins or leaves.
    """

    name: ClassVar[str]  # e.g. "llama-cpp"; the ``backend:`` value in mesh.yaml
    kind: ClassVar[str]  # "text" or "image"
    operations: ClassVar[tuple[str, ...]]  # subset of mesh.protocol.TEXT_OPERATIONS / IMAGE_OPERATIONS
    api_version: ClassVar[int] = API_VERSION

    def __init__(self, config: ModelConfig):
        self.config = config

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """None when this backend can load on this host, else why not and how to fix it."""
        return None

    @classmethod
    def embedded_models(cls) -> list[ModelConfig]:
        """Models this backend serves with no configuration (shipped in a package or built locally)."""
        return []

    @abc.abstractmethod
    def load(self) -> dict[str, Any]:
        """Load the model (blocking). Return metadata to advertise: n_ctx, limits, template, size..."""

    @abc.abstractmethod
    def run(self, job: Job, ctx: JobContext) -> Result:
        """Run one job (blocking, in a worker thread) and return its result, of the type of ``job.op``
        (``TextResult`` for ``completion`` and ``chat``, ``ImageResult`` for ``txt2img`` ...); ``job.params``
        is of the matching params type with every default applied. Raise BackendError subclasses for errors
        a client should see. Stream with ``ctx.emit``; stop early when ``ctx.cancelled``."""

    def set_threads(self, n: int) -> None:  # noqa: B027 - an optional hook: doing nothing is its default
        """The worker's share of the CPU changed: use ``n`` threads from now on (at least 1), ideally from
        the next token or step. Called from a thread other than the jobs', possibly while jobs run or before
        ``load()`` has returned; it must not block for long. A count fixed in the model's options stays as
        it is. The default does nothing (backends that do not compute on the CPU, or cannot change it)."""

    def close(self) -> None:  # noqa: B027 - an optional hook: doing nothing is its default
        """Release the model."""


# Helpers for text backends, importable from here (the stable module); defined in textutil.py.
from velesio.backends.textutil import StopMatcher, render_plain_chat  # noqa: E402
