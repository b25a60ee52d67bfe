"""The engine: one llama.cpp context, ``n_seq`` sequences, one thread that decodes them all together.

See the package docstring for the design; this module is the context and the step loop.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import llama_cpp
import numpy as np

from velesio.backends import BackendError, Cancelled, ContextExceeded, InvalidRequest
from velesio.backends.grammar_guard import guard_for
from velesio.backends.llama_engine.cache import Slot, pick_donor, pick_slot
from velesio.backends.llama_engine.jobs import EngineClosed, Generation, OnPiece, Run
from velesio.backends.llama_engine.sampling import PieceDecoder, Sampler
from velesio.mesh.params import LOGPROB_FLOOR, MAX_TOKENS, TextParams, TextResult

log = logging.getLogger(__name__)

_backend_ready = False
_backend_lock = threading.Lock()


class Engine:
    """Continuous batching on one llama.cpp context. Construct, :meth:`submit` from any thread, :meth:`close`.

    ``model``: a GGUF path (loaded here, freed by :meth:`close`), or an already loaded model: a
    ``llama_cpp.Llama``, its ``_model`` (``LlamaModel``) or a raw ``llama_model_p``, which the caller keeps
    alive and frees. ``n_ctx`` is the context of each sequence (the whole context holds ``n_ctx * n_seq``
    tokens); llama.cpp may round it up, :attr:`n_ctx` is the size in force. ``n_running`` (default
    ``n_seq``) is how many jobs run at once: the other sequences only keep finished jobs' prompts as prefix
    cache, so that more conversations stay cached than run. ``n_batch`` bounds the tokens of one decode
    (one per generating sequence, the rest prompt chunks); it must be at least ``n_running``.
    ``flash_attn`` None lets llama.cpp decide (it turns it on where the device supports it, CPU included);
    ``llama_cpp.Llama`` turns it off unless asked, and the last bits of the logits differ between the two,
    so pass False to reproduce a ``Llama``'s greedy text exactly. ``context_shift``: a generation that fills
    its sequence's context drops old tokens and goes on (llama.cpp's ``--context-shift``) instead of ending
    there; ignored, with a warning, where the memory cannot shift (``context_shift`` then reads False)."""

    def __init__(self, model: str | os.PathLike[str] | Any, *, n_ctx: int = 2048, n_seq: int = 4,
                 n_running: int | None = None, n_batch: int = 512, n_threads: int | None = None,
                 n_threads_batch: int | None = None,
                 n_gpu_layers: int = 0, flash_attn: bool | None = None, context_shift: bool = False,
                 verbose: bool = False):
        global _backend_ready
        if n_seq < 1 or n_seq > llama_cpp.llama_max_parallel_sequences():
            raise ValueError(f"n_seq must be between 1 and {llama_cpp.llama_max_parallel_sequences()}")
        if n_batch < min(n_seq, n_running or n_seq):
            raise ValueError("n_batch must be at least n_running (each generating sequence adds a token per step)")
        if not verbose:
            logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's log, as Llama does
        with _backend_lock:
            if not _backend_ready:
                llama_cpp.llama_backend_init()
                _backend_ready = True
        self._owned_model = None
        if isinstance(model, str | os.PathLike):
            path = os.fspath(model)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"GGUF file not found: {path!r}")
            mparams = llama_cpp.llama_model_default_params()
            mparams.n_gpu_layers = n_gpu_layers
            self._owned_model = llama_cpp.llama_model_load_from_file(path.encode(), mparams)
            if not self._owned_model:
                raise RuntimeError(f"llama.cpp could not load {path!r}")
            self._model_ref: Any = None
            self.model = self._owned_model
        else:
            self._model_ref = model  # keeps the caller's object (and so the model) alive
            inner = getattr(model, "_model", model)
            self.model = getattr(inner, "model", inner)
        n_threads = max(1, n_threads or os.cpu_count() or 1)
        n_threads_batch = max(1, n_threads_batch or n_threads)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx * n_seq
        cparams.n_seq_max = n_seq
        cparams.kv_unified = False  # a KV stream per sequence: see the package docstring
        cparams.n_batch = n_batch
        cparams.n_ubatch = min(n_batch, 512)
        cparams.n_threads, cparams.n_threads_batch = n_threads, n_threads_batch
        cparams.no_perf = True
        if flash_attn is not None:  # None: llama.cpp decides (on where the device supports it)
            cparams.flash_attn_type = (llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                                       else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self._free_model()
            raise RuntimeError("llama.cpp could not create the context")
        self.n_ctx = int(llama_cpp.llama_n_ctx_seq(self.ctx))
        self.n_seq = n_seq
        self.n_running = max(1, min(n_seq, n_running or n_seq))
        self.n_batch = n_batch
        self.n_threads, self.n_threads_batch = n_threads, n_threads_batch
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.eos = int(llama_cpp.llama_vocab_eos(self.vocab))
        self.eog = [t for t in range(self.n_vocab) if llama_cpp.llama_vocab_is_eog(self.vocab, t)]
        self._eog = frozenset(self.eog)
        self._pieces: dict[int, bytes] = {}  # token -> its bytes with special tokens rendered (probabilities)
        self._special_pieces = PieceDecoder(self.vocab, special=True)
        self._mem = llama_cpp.llama_get_memory(self.ctx)
        self.context_shift = bool(context_shift) and bool(llama_cpp.llama_memory_can_shift(self._mem))
        if context_shift and not self.context_shift:
            log.warning("context_shift is not supported by this model's memory: generations end at the context")
        self._add_bos = bool(llama_cpp.llama_vocab_get_add_bos(self.vocab))
        self._model_lock = threading.Lock()  # tokenize, grammars (other threads) against freeing the model
        self._batch = llama_cpp.llama_batch_init(n_batch, 0, 1)
        self._b_token = np.ctypeslib.as_array(self._batch.token, shape=(n_batch,))
        self._b_pos = np.ctypeslib.as_array(self._batch.pos, shape=(n_batch,))
        self._b_logits = np.ctypeslib.as_array(self._batch.logits, shape=(n_batch,))
        np.ctypeslib.as_array(self._batch.n_seq_id, shape=(n_batch,))[:] = 1
        self._slots = [Slot(seq_id=i) for i in range(n_seq)]
        self._runs: list[Run] = []  # started jobs, in the order they started
        self._can_trim = True  # the memory can drop the end of a sequence (not a recurrent model's)
        self._tick = 0
        # Shared with other threads, under _cond:
        self._cond = threading.Condition()
        self._waiting: deque[Generation] = deque()
        self._closed = False
        self._new_threads: tuple[int, int] | None = None
        self._warm_up()
        self._thread = threading.Thread(target=self._loop, name="llama-engine", daemon=True)
        self._thread.start()

    # ---- any thread ---------------------------------------------------------------------------
    def submit(self, prompt_tokens: Sequence[int], params: TextParams, on_piece: OnPiece | None = None,
               cancelled: Callable[[], bool] | None = None, extra_stops: Sequence[str] = ()) -> Generation:
        """Queue a job; returns at once with its handle.

        ``on_piece(text, tokens, probs)`` is called on the engine thread for each piece of text that is safe
        to show (a possible stop string is held back, an incomplete character too) with the tokens sampled
        since the previous piece and, when ``params.logprobs`` is set, their probabilities (one entry per
        token, the shape of ``TextResult.probs``): keep it quick, it holds up every sequence. ``cancelled()``
        is polled once per step.
        ``extra_stops`` are stop strings besides ``params.stop`` (a chat template's). Raises
        ``ContextExceeded`` for a prompt that does not fit a sequence's context, ``InvalidRequest`` for an
        empty prompt, unknown token ids or a grammar that cannot be used, ``EngineClosed`` after close()."""
        prompt = [int(t) for t in prompt_tokens]
        if not prompt:
            raise InvalidRequest("the prompt has no tokens")
        if any(not 0 <= t < self.n_vocab for t in prompt):
            raise InvalidRequest(f"prompt: token ids must be between 0 and {self.n_vocab - 1}")
        if len(prompt) >= self.n_ctx:
            raise ContextExceeded(f"the prompt is {len(prompt)} tokens; a sequence has a context of "
                                  f"{self.n_ctx} tokens")
        room = self.n_ctx - len(prompt)
        if self.context_shift:  # the context never ends the generation; MAX_TOKENS bounds "until the end"
            limit = MAX_TOKENS if params.max_tokens < 0 else int(params.max_tokens)
        else:
            limit = room if params.max_tokens < 0 else min(int(params.max_tokens), room)
        seed = params.seed if params.seed is not None and params.seed >= 0 else random.getrandbits(31)
        guard = None
        if params.grammar or params.json_schema:
            with self._model_lock:
                self._check_model()
                guard = guard_for(self.model, params, self.eog, self.eos)
        bias = self._logit_bias(params)
        gen = Generation(self, prompt, params, seed, limit, on_piece, cancelled, list(extra_stops), guard)
        gen.logit_bias = bias
        with self._cond:
            if self._closed:
                gen._fail(EngineClosed("the engine is closed"))
                raise EngineClosed("the engine is closed")
            self._waiting.append(gen)
            self._cond.notify()
        return gen

    def _logit_bias(self, params: TextParams) -> list[tuple[int, float]]:
        """``params.logit_bias`` as (token id, bias) pairs: a string biases each of its tokens (as llama.cpp
        does), None or -inf bans the token. InvalidRequest for an id outside the vocabulary."""
        out: list[tuple[int, float]] = []
        for entry in params.logit_bias:
            key, bias = entry[0], entry[1]
            value = float("-inf") if bias is None else float(bias)
            if isinstance(key, str):
                out += [(t, value) for t in self.tokenize(key, add_bos=False, special=False)]
            elif not 0 <= int(key) < self.n_vocab:
                raise InvalidRequest(f"logit_bias: token ids must be between 0 and {self.n_vocab - 1}, got {key}")
            else:
                out.append((int(key), value))
        return out

    def set_threads(self, n_threads: int, n_threads_batch: int | None = None) -> None:
        """Use these thread counts from the next decode on."""
        n = max(1, int(n_threads))
        with self._cond:
            self._new_threads = (n, max(1, int(n_threads_batch or n)))
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        """Stop the engine thread; every job not finished fails with ``EngineClosed``; free the context (and
        the model, when this engine loaded it)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tokenize(self, text: str, add_bos: bool = True, special: bool = True) -> list[int]:
        """``text`` as token ids (reads the model's vocabulary only: any thread may call it)."""
        data = text.encode()
        size = len(data) + 8
        with self._model_lock:
            self._check_model()
            while True:
                buf = (llama_cpp.llama_token * size)()
                n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, size, add_bos, special)
                if n >= 0:
                    return list(buf[:n])
                size = -n

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens`` as generation shows it (special tokens render as nothing)."""
        with self._model_lock:
            self._check_model()
            decoder = PieceDecoder(self.vocab)
            return "".join(decoder.feed(int(t)) for t in tokens) + decoder.flush()

    def _check_model(self) -> None:
        if self.vocab is None:
            raise EngineClosed("the engine is closed")

    @property
    def waiting(self) -> int:
        """Jobs submitted and not yet started."""
        with self._cond:
            return len(self._waiting)

    @property
    def running(self) -> int:
        """Jobs that have a sequence (a snapshot: the engine thread changes it between steps)."""
        return len(self._runs)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- the engine thread --------------------------------------------------------------------
    def _warm_up(self) -> None:
        """Decode one token once (and forget it), so the first job does not pay for paging the weights in."""
        self._batch.n_tokens = 0
        self._add(self.eos, 0, 0, False)
        llama_cpp.llama_decode(self.ctx, self._batch)
        llama_cpp.llama_memory_clear(self._mem, True)

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while not (self._closed or self._waiting or self._runs or self._new_threads):
                        self._cond.wait()
                    if self._closed:
                        return
                    threads, self._new_threads = self._new_threads, None
                if threads is not None:
                    llama_cpp.llama_set_n_threads(self.ctx, *threads)
                    self.n_threads, self.n_threads_batch = threads
                try:
                    self._step()
                except Exception as exc:  # a bug here must not end the engine: drop what ran, go on
                    log.exception("llama engine step failed")
                    for run in list(self._runs):
                        self._end(run, error=BackendError(f"the engine failed: {exc}"))
                    llama_cpp.llama_memory_clear(self._mem, True)
                    for slot in self._slots:
                        slot.tokens = []
        finally:
            self._shut_down()

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        self._take_donated()
        batch_runs = self._fill_batch()
        if not batch_runs:
            return
        ret = llama_cpp.llama_decode(self.ctx, self._batch)
        if ret != 0:
            # Nothing a job asks for should make a decode fail (prompts fit, ids are checked); if one does,
            # the sequences in this batch are in an unknown state: end their jobs and empty them.
            for run, _n, _out in batch_runs:
                llama_cpp.llama_memory_seq_rm(self._mem, run.slot.seq_id, -1, -1)
                run.slot.tokens = []
                self._end(run, error=BackendError(f"llama_decode failed (code {ret})"))
            return
        for run, n, out in batch_runs:
            if run.pending is not None:  # a generating sequence: its token is in the cache now
                run.slot.tokens.append(run.pending)
                run.pending = None
            else:
                run.slot.tokens.extend(run.gen.prompt_tokens[run.n_past:run.n_past + n])
            run.n_past += n
            try:
                if out >= 0:
                    self._advance(run, out)
                elif run.n_past >= len(run.gen.prompt_tokens) and run.gen.limit == 0:
                    self._finish(run, "length", "limit")  # max_tokens 0: the prompt is in the cache
            except Exception as exc:  # this job's error (its on_piece, its grammar): end it alone
                self._end(run, error=exc)

    def _drop_cancelled(self) -> None:
        with self._cond:
            waiting = list(self._waiting)
        gone = [g for g in waiting if self._dropped(g)]
        if gone:
            with self._cond:
                for gen in gone:
                    self._waiting.remove(gen)
            for gen in gone:
                gen._fail(Cancelled("cancelled"))
        for run in list(self._runs):
            if self._dropped(run.gen):
                self._end(run, error=Cancelled("cancelled"))

    @staticmethod
    def _dropped(gen: Generation) -> bool:
        try:
            return gen._should_stop()
        except Exception:  # a cancelled() that raises: stop the job rather than the engine
            log.exception("a job's cancelled() raised")
            return True

    def _admit(self) -> None:
        """Start waiting jobs while sequences are free, in the order they came."""
        while True:
            with self._cond:
                if not self._waiting:
                    return
                gen = self._waiting[0]
                if len(self._runs) >= self.n_running:
                    return
                choice = pick_slot(self._slots, gen.prompt_tokens, gen.params.cache_prompt)
                if choice is None:
                    return
                self._waiting.popleft()
            slot, keep = choice
            try:
                self._start(gen, slot, keep)
            except Exception as exc:
                gen._fail(exc)

    def _start(self, gen: Generation, slot: Slot, keep: int) -> None:
        if keep < len(slot.tokens):
            keep = self._trim(slot.seq_id, keep)
            slot.tokens = slot.tokens[:keep]
        seed = gen.seed % 0xFFFFFFFF  # 32 bits, never llama.cpp's "random" value 0xFFFFFFFF
        sampler = Sampler(gen.params, n_vocab=self.n_vocab, n_ctx=self.n_ctx, seed=seed, eog=self.eog,
                          guard=gen._guard, bias=gen.logit_bias)
        try:
            sampler.prime(gen.prompt_tokens)
        except Exception:
            sampler.close()
            raise
        slot.busy = True
        gen.seq_id = slot.seq_id
        gen.tokens_cached = keep
        run = Run(gen, slot, sampler, self.vocab)
        if gen.params.cache_prompt and self._can_trim:
            self._find_donor(run)
        self._runs.append(run)
        gen._started.set()

    def _trim(self, seq: int, keep: int) -> int:
        """Drop sequence ``seq``'s KV from position ``keep`` on; returns how much it keeps: ``keep``, or 0 where
        the memory cannot drop part of a sequence (a recurrent model's), which then empties it."""
        if llama_cpp.llama_memory_seq_rm(self._mem, seq, keep, -1):
            return keep
        self._can_trim = False
        llama_cpp.llama_memory_seq_rm(self._mem, seq, -1, -1)
        return 0

    # ---- prefixes copied between sequences ----------------------------------------------------
    def _find_donor(self, run: Run) -> None:
        """Copy a longer prefix of the run's prompt from another sequence than its own slot kept, or, when a
        job still evaluating its prompt will hold one (the choices of one request, sent together), wait for
        that job's evaluation and copy it then (``_take_donated``)."""
        upcoming = {r.slot.seq_id: r.gen.prompt_tokens for r in self._runs
                    if r.donor is None and r.n_past < len(r.gen.prompt_tokens)}
        found = pick_donor(self._slots, run.slot, run.gen.prompt_tokens, run.n_past, upcoming)
        if found is None:
            return
        donor, n, ready = found
        if ready:
            self._copy_prefix(run, donor, n)
        else:
            run.donor = (next(r for r in self._runs if r.slot is donor), n)

    def _take_donated(self) -> None:
        """Runs waiting for another's prompt copy it once it is in the cache (or once that job has ended,
        whatever of it got there); until then they add nothing to the batch."""
        for run in self._runs:
            if run.donor is None:
                continue
            source, wanted = run.donor
            if source in self._runs and source.n_past < wanted:
                continue
            run.donor = None
            found = pick_donor([source.slot], run.slot, run.gen.prompt_tokens, run.n_past, {})
            if found is not None:
                self._copy_prefix(run, source.slot, found[1])

    def _copy_prefix(self, run: Run, donor: Slot, n: int) -> None:
        """Make the run's sequence hold the first ``n`` tokens of ``donor``'s (what it held is replaced)."""
        seq = run.slot.seq_id
        llama_cpp.llama_memory_seq_cp(self._mem, donor.seq_id, seq, -1, -1)  # across streams: the whole stream
        n = self._trim(seq, n)
        run.slot.tokens = donor.tokens[:n]
        run.n_past = n
        run.gen.tokens_cached = n

    def _add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        i = self._batch.n_tokens
        self._b_token[i] = token
        self._b_pos[i] = pos
        self._batch.seq_id[i][0] = seq_id
        self._b_logits[i] = logits
        self._batch.n_tokens = i + 1
        return i

    def _fill_batch(self) -> list[tuple[Run, int, int]]:
        """One batch: the next token of every generating sequence, then prompt chunks in the order the jobs
        started, up to n_batch tokens. Returns (run, tokens it added, its output row or -1)."""
        self._batch.n_tokens = 0
        added: list[tuple[Run, int, int]] = []
        for run in list(self._runs):
            if run.pending is not None:
                if run.n_past >= self.n_ctx and not self._shift(run):
                    self._finish(run, "length", "limit")
                    continue
                added.append((run, 1, self._add(run.pending, run.n_past, run.slot.seq_id, True)))
        for run in self._runs:
            room = self.n_batch - self._batch.n_tokens
            if room <= 0:
                break
            prompt = run.gen.prompt_tokens
            if run.pending is not None or run.donor is not None or run.n_past >= len(prompt):
                continue
            n = min(room, len(prompt) - run.n_past)
            out = -1
            for j in range(run.n_past, run.n_past + n):
                last = j == len(prompt) - 1 and run.gen.limit > 0  # max_tokens 0 needs no logits
                i = self._add(prompt[j], j, run.slot.seq_id, last)
                out = i if last else out
            added.append((run, n, out))
        return added

    def _shift(self, run: Run) -> bool:
        """llama.cpp's context shift for a run whose context is full: keep the first ``n_keep`` tokens (the
        prompt's, -1 all of it; its BOS besides), drop half of the rest and move what follows back. False when
        nothing can be dropped."""
        n_keep = run.gen.params.n_keep
        n_keep = len(run.gen.prompt_tokens) if n_keep < 0 else n_keep + int(self._add_bos)
        n_keep = min(self.n_ctx - 4, n_keep)
        n_left = run.n_past - n_keep
        n_discard = min(n_left // 2, n_left - 1)
        if n_discard <= 0:
            return False
        seq = run.slot.seq_id
        llama_cpp.llama_memory_seq_rm(self._mem, seq, n_keep, n_keep + n_discard)
        llama_cpp.llama_memory_seq_add(self._mem, seq, n_keep + n_discard, run.n_past, -n_discard)
        run.slot.tokens = run.slot.tokens[:n_keep] + run.slot.tokens[n_keep + n_discard:]
        run.n_past -= n_discard
        run.truncated = True
        return True

    def _advance(self, run: Run, row: int) -> None:
        """Sample the run's next token from ``row`` and deliver what it adds to the text."""
        token = run.sampler.sample(self.ctx, row)
        probs = self._token_probs(run, row, token) if run.gen.params.logprobs is not None else None
        now = time.perf_counter()
        if run.t_first is None:
            run.t_first = now
        run.n_sampled += 1
        guard = run.sampler.guard
        if guard is not None and guard.error:
            self._end(run, error=InvalidRequest(guard.error))
            return
        if token in self._eog:
            run.n_sampled -= 1  # the end of generation is not a token of the reply
            self._finish(run, "stop", "eos")
            return
        run.unsent.append(token)
        if probs is not None:
            run.unsent_probs.append(probs)
        text = run.decoder.feed(token)
        if text:
            self._deliver(run, run.matcher.feed(text))
        if run.matcher.stopped is not None:
            self._finish(run, "stop", "word")
        elif run.n_sampled >= run.gen.limit:
            self._finish(run, "length", "limit")
        else:
            run.pending = token

    def _deliver(self, run: Run, text: str) -> None:
        if not text:
            return
        run.parts.append(text)
        tokens, run.unsent = run.unsent, []
        probs, run.unsent_probs = run.unsent_probs, []
        if run.gen._on_piece is not None:
            run.gen._on_piece(text, tokens, probs)

    # ---- token probabilities ------------------------------------------------------------------
    def _token_probs(self, run: Run, row: int, token: int) -> dict[str, Any]:
        """The sampled ``token``'s log-probability and its ``params.logprobs`` most likely alternatives:
        under the model's distribution at ``row`` (llama.cpp's n_probs), or, with ``post_sampling_probs``,
        among the candidates the sampler chain left."""
        n = max(0, int(run.gen.params.logprobs or 0))
        candidates = run.sampler.candidates
        if candidates is not None:
            ids, p = candidates
            with np.errstate(divide="ignore"):
                logp = np.log(p)
            hit = np.flatnonzero(ids == token)
            chosen = float(logp[hit[0]]) if hit.size else LOGPROB_FLOOR
            top = [(int(ids[i]), float(logp[i])) for i in range(min(n, len(ids)))]
        else:
            logits = llama_cpp.llama_get_logits_ith(self.ctx, row)
            x = np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).astype(np.float64)
            peak = x.max()
            log_total = peak + np.log(np.exp(x - peak).sum())
            chosen = float(x[token] - log_total)
            top = []
            if n:
                k = min(n, self.n_vocab)
                best = np.argpartition(-x, k - 1)[:k]
                best = best[np.argsort(-x[best], kind="stable")]
                top = [(int(t), float(x[t] - log_total)) for t in best]
        return {**self._token_entry(token, chosen),
                "top": [self._token_entry(t, lp) for t, lp in top]}

    def _token_entry(self, token: int, logprob: float) -> dict[str, Any]:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._special_pieces.piece(token)
        value = logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR  # never -inf or NaN on the wire
        return {"id": token, "token": piece.decode(errors="replace"), "bytes": piece, "logprob": value}

    def _finish(self, run: Run, finish: str, stop_type: str) -> None:
        end = time.perf_counter()
        if run.matcher.stopped is None:
            rest = run.matcher.feed(run.decoder.flush())
            if run.matcher.stopped is not None:
                finish, stop_type = "stop", "word"
            self._deliver(run, rest + run.matcher.flush())
        if run.unsent and stop_type != "word" and run.gen._on_piece is not None:
            # tokens that added no text (special tokens): their ids and probabilities still belong to the
            # reply (a stop string's tokens do not: they are cut, as its text is)
            run.gen._on_piece("", run.unsent, run.unsent_probs)
            run.unsent, run.unsent_probs = [], []
        first = run.t_first or end
        result = TextResult.timed(
            text="".join(run.parts), finish_reason=finish, stop_type=stop_type,
            stopping_word=run.matcher.stopped or "", prompt_tokens=len(run.gen.prompt_tokens),
            completion_tokens=run.n_sampled, seed=run.gen.seed, prompt_ms=(first - run.t_start) * 1000,
            predicted_ms=(end - first) * 1000, tokens_cached=run.gen.tokens_cached,
            truncated=run.truncated or (stop_type == "limit" and run.n_past + 1 >= self.n_ctx))
        self._end(run, result=result)

    def _end(self, run: Run, result: TextResult | None = None, error: BaseException | None = None) -> None:
        """Free the run's sequence (its KV stays as a cache entry) and settle its handle."""
        if run in self._runs:
            self._runs.remove(run)
        self._tick += 1
        run.slot.busy = False
        run.slot.last_used = self._tick
        run.sampler.close()
        if result is not None:
            run.gen._succeed(result)
        else:
            run.gen._fail(error or BackendError("the job ended without a result"))

    def _shut_down(self) -> None:
        closed = EngineClosed("the engine was closed")
        for run in list(self._runs):
            self._end(run, error=closed)
        with self._cond:
            self._closed = True
            waiting, self._waiting = list(self._waiting), deque()
        for gen in waiting:
            gen._fail(closed)
        llama_cpp.llama_batch_free(self._batch)
        llama_cpp.llama_free(self.ctx)
        self.ctx = None
        self._free_model()

    def _free_model(self) -> None:
        with getattr(self, "_model_lock", None) or threading.Lock():
            self.vocab = None
            if self._owned_model:
                llama_cpp.llama_model_free(self._owned_model)
                self._owned_model = None
