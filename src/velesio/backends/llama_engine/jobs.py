"""A job of the engine as its caller sees it (:class:`Generation`) and as the engine thread runs it (``Run``)."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from velesio.backends import BackendError
from velesio.backends.grammar_guard import GrammarGuard
from velesio.backends.llama_engine.cache import Slot
from velesio.backends.llama_engine.sampling import PieceDecoder, Sampler
from velesio.backends.textutil import StopMatcher
from velesio.mesh.params import TextParams, TextResult

if TYPE_CHECKING:
    from velesio.backends.llama_engine.engine import Engine

# (text, its tokens, their probabilities: one dict per token when the job asked for them, else empty)
OnPiece = Callable[[str, list[int], list[dict[str, Any]]], None]


class EngineClosed(BackendError):
    """The engine was closed before (or while) the job ran."""


class Generation:
    """The handle of one submitted job. Thread-safe; the engine thread fills it in.

    ``result()`` waits for the :class:`TextResult` (or raises the job's error: ``Cancelled``,
    ``InvalidRequest`` for a grammar that cannot go on, ``EngineClosed``, ...). ``tokens_cached`` is how many
    prompt tokens came from the prefix cache (known once the job has started)."""

    def __init__(self, engine: Engine, prompt: list[int], params: TextParams, seed: int, limit: int,
                 on_piece: OnPiece | None, cancelled: Callable[[], bool] | None, stops: list[str],
                 guard: GrammarGuard | None):
        self.prompt_tokens = prompt
        self.params = params
        self.seed = seed
        self.limit = limit  # the most tokens it may sample (max_tokens, bounded by the context)
        self.tokens_cached = 0
        self.logit_bias: list[tuple[int, float]] = []  # params.logit_bias with strings turned into ids
        self.seq_id: int | None = None  # the llama.cpp sequence it runs in, once started
        self.future: concurrent.futures.Future[TextResult] = concurrent.futures.Future()
        self._engine = engine
        self._on_piece = on_piece
        self._cancelled = cancelled
        self._stops = stops
        self._guard = guard
        self._cancel = False
        self._started = threading.Event()

    def result(self, timeout: float | None = None) -> TextResult:
        return self.future.result(timeout)

    def done(self) -> bool:
        return self.future.done()

    @property
    def started(self) -> bool:
        """The job has a sequence (its prompt is being evaluated, or it is generating, or it has ended)."""
        return self._started.is_set()

    def wait_started(self, timeout: float | None = None) -> bool:
        return self._started.wait(timeout)

    def cancel(self) -> None:
        """Stop the job at the engine's next step; its result raises ``Cancelled``."""
        self._cancel = True
        self._engine._wake()

    def _should_stop(self) -> bool:
        return self._cancel or self.future.cancelled() or bool(self._cancelled and self._cancelled())

    def _fail(self, exc: BaseException) -> None:
        self._started.set()
        if self._guard is not None:
            self._guard.close()
        if not self.future.done():
            try:
                self.future.set_exception(exc)
            except concurrent.futures.InvalidStateError:  # cancelled through the future meanwhile
                pass

    def _succeed(self, result: TextResult) -> None:
        if not self.future.done():
            try:
                self.future.set_result(result)
            except concurrent.futures.InvalidStateError:
                pass


class Run:
    """The engine thread's state of a started job."""

    def __init__(self, gen: Generation, slot: Slot, sampler: Sampler, vocab: Any):
        self.gen = gen
        self.slot = slot
        self.sampler = sampler
        self.n_past = len(slot.tokens)  # prompt tokens in the KV cache so far
        self.pending: int | None = None  # a sampled token to decode at position n_past
        # (a job evaluating the same prompt, how many of its tokens to copy once they are in its cache)
        self.donor: tuple[Run, int] | None = None
        self.n_sampled = 0
        self.truncated = False  # the context was shifted (or filled up)
        self.decoder = PieceDecoder(vocab)
        self.matcher = StopMatcher([*gen.params.stop, *gen._stops])
        self.parts: list[str] = []
        self.unsent: list[int] = []  # tokens sampled since the last piece delivered
        self.unsent_probs: list[dict[str, Any]] = []  # and their probabilities (params.logprobs)
        self.t_start = time.perf_counter()
        self.t_first: float | None = None
