"""The llama backend's other generator (``options.engine: contexts``): one ``llama_cpp.Llama`` context per
slot, each decoding its own sequence on all its threads, as the backend did before the batching engine
(backends/llama_engine). Kept to compare against (the benchmark's "mesh, contexts" rows) and as a fallback
while the engine is new; the engine is the default."""

from __future__ import annotations

import dataclasses
import queue
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

from velesio.backends import Cancelled, InvalidRequest, JobContext, NotSupported, TextParams, TextResult
from velesio.backends.grammar_guard import guard_for
from velesio.backends.textutil import StopMatcher


@dataclasses.dataclass(slots=True)
class _Sampled:
    """The tokens one generation has sampled so far, and when the first came."""

    n: int = 0
    first: float | None = None


class ContextPool:
    """``slots`` contexts of one model; a generation borrows one for its whole run."""

    def __init__(self, kwargs: dict[str, Any], slots: int, eog: list[int]):
        import llama_cpp

        self._pool: queue.Queue[Any] = queue.Queue()
        self.contexts = [llama_cpp.Llama(**kwargs) for _ in range(max(1, slots))]
        for llm in self.contexts:
            # Touch the weights once now, so the first request does not pay for paging the model in.
            llm.eval([llm.token_bos()])
            llm.reset()
            self._pool.put(llm)
        self.n_ctx = self.contexts[0].n_ctx()
        self._eog = eog
        self._lock = threading.Lock()

    def set_threads(self, n_threads: int, n_batch: int) -> None:
        """llama-cpp-python passes no thread count per call: llama.cpp reads the context's own from its next
        decode on. The Llama object's copies are kept in step for whatever reads them (its pickling does)."""
        import llama_cpp

        for llm in self.contexts:
            llama_cpp.llama_set_n_threads(llm.ctx, n_threads, n_batch)
            llm.n_threads, llm.n_threads_batch = n_threads, n_batch
            llm.context_params.n_threads, llm.context_params.n_threads_batch = n_threads, n_batch

    def close(self) -> None:
        for llm in self.contexts:
            llm.close()
        self.contexts = []

    def generate(self, prompt_ids: list[int], p: TextParams, ctx: JobContext,
                 extra_stops: Sequence[str] = ()) -> TextResult:
        if p.logprobs is not None:
            raise InvalidRequest("token probabilities need the batching engine (options.engine: batched)")
        llm = self._pool.get()
        try:
            return self._generate(llm, prompt_ids, p, ctx, extra_stops)
        finally:
            self._pool.put(llm)

    def _generate(self, llm: Any, prompt_ids: list[int], p: TextParams, ctx: JobContext,
                  extra_stops: Sequence[str]) -> TextResult:
        if p.logit_bias:
            raise NotSupported("logit_bias needs the batched engine (options.engine: batched)")
        t0 = time.perf_counter()
        max_tokens = int(p.max_tokens)
        if max_tokens == 0:
            self._evaluate_only(llm, prompt_ids)
            ms = (time.perf_counter() - t0) * 1000
            return TextResult.timed(text="", finish_reason="length", stop_type="limit", prompt_tokens=len(prompt_ids),
                                    completion_tokens=0, prompt_ms=ms, predicted_ms=0.0)
        room = self.n_ctx - len(prompt_ids)
        limit = room if max_tokens < 0 else min(max_tokens, room)
        # The grammar never enters llama-cpp-python's sampler chain, where llama.cpp accepts each chosen token
        # natively and aborts the process on one the grammar does not allow (backends/grammar_guard.py).
        guard = guard_for(llm._model.model, p, self._eog, llm.token_eos()) if p.grammar or p.json_schema else None
        counter = _Sampled()
        banned = self._eog if p.ignore_eos and guard is None else []  # a guard applies ignore_eos itself

        def count(ids: Any, scores: Any) -> Any:
            # Called once per sampled token: counts tokens, times the first, applies the grammar and
            # ignore_eos (llama-cpp-python drops its own logits_processor when logit_bias is also given).
            counter.n += 1
            if counter.first is None:
                counter.first = time.perf_counter()
            if guard is not None:
                return guard(ids, scores)
            if banned:
                scores[banned] = -float("inf")
            return scores

        seed = p.seed if p.seed is not None and p.seed >= 0 else random.getrandbits(31)
        if not p.cache_prompt:
            # Reusing a cached prefix changes the batch shapes and so the last bits of the logits: a fixed
            # seed is only reproducible when the whole prompt is evaluated afresh (llama.cpp says the same).
            llm.reset()
        matcher = StopMatcher(list(p.stop) + list(extra_stops))
        stream = llm.create_completion(
            prompt_ids, max_tokens=limit, temperature=float(p.temperature), top_p=float(p.top_p),
            top_k=int(p.top_k), min_p=float(p.min_p), typical_p=float(p.typical_p),
            frequency_penalty=float(p.frequency_penalty), presence_penalty=float(p.presence_penalty),
            repeat_penalty=float(p.repeat_penalty), seed=seed, stream=True,
            mirostat_mode=int(p.mirostat), mirostat_tau=float(p.mirostat_tau),
            mirostat_eta=float(p.mirostat_eta), logits_processor=[count])
        text_parts: list[str] = []
        finish = "length"
        try:
            for chunk in stream:
                if ctx.cancelled:
                    raise Cancelled("cancelled")
                choice = chunk["choices"][0]
                piece = matcher.feed(choice.get("text") or "")
                if piece:
                    text_parts.append(piece)
                    ctx.emit({"text": piece})
                if matcher.stopped is not None:
                    finish = "stop"
                    break
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                if guard is not None and guard.error:
                    break
        finally:
            stream.close()
            if guard is not None:
                guard.close()
        if guard is not None and guard.error:
            raise InvalidRequest(guard.error)
        tail = matcher.flush()
        if tail:
            text_parts.append(tail)
            ctx.emit({"text": tail})
        end = time.perf_counter()
        first = counter.first or end
        stop_type = "word" if matcher.stopped is not None else "eos" if finish == "stop" else "limit"
        produced = counter.n - 1 if stop_type == "eos" and counter.n else counter.n  # not the end token
        return TextResult.timed(text="".join(text_parts), finish_reason=finish, stop_type=stop_type,
                                stopping_word=matcher.stopped or "", prompt_tokens=len(prompt_ids),
                                completion_tokens=produced, prompt_ms=(first - t0) * 1000,
                                predicted_ms=(end - first) * 1000, seed=seed)

    @staticmethod
    def _evaluate_only(llm: Any, ids: list[int]) -> None:
        """n_predict 0: bring the prompt into the context (prompt cache) and generate nothing."""
        cached = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], ids, strict=False):
            if a != b:
                break
            cached += 1
        cached = min(cached, len(ids) - 1)
        llm.n_tokens = cached
        llm.eval(ids[cached:])
