"""Per-sequence sampling and text: a llama.cpp sampler chain built from a job's ``TextParams`` (with the
request's grammar applied in front of it by a ``GrammarGuard``), and the decoding of sampled tokens into
text that never splits a UTF-8 character.

The chain follows llama.cpp's common sampler (and llama-cpp-python's ``Llama.sample``, so a greedy job gives
the text ``create_completion(temperature=0)`` gives): [ban end-of-generation] → penalties → greedy when the
temperature is 0 (or below), else mirostat 1 or 2 after the temperature, else top-k → typical → top-p →
min-p → temperature → a seeded random draw. Each sequence has its own chain, so its random state (and
mirostat's) depends on its own seed and tokens only, never on its neighbours in the batch.

Penalties see the last ``repeat_last_n`` tokens of the prompt and of the generated text, as llama.cpp's
server counts them (llama-cpp-python's ``create_completion`` penalises generated tokens only).
"""

from __future__ import annotations

import codecs
import ctypes
from collections.abc import Sequence

import llama_cpp
import numpy as np

from velesio.backends.grammar_guard import GrammarGuard
from velesio.mesh.params import TextParams

# llama_token_data as numpy sees it (as in grammar_guard.py).
_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


def chain_for(params: TextParams, *, n_vocab: int, n_ctx: int, seed: int, ban: Sequence[int],
              bias: Sequence[tuple[int, float]] = ()) -> int:
    """A new llama.cpp sampler chain (the caller frees it with ``llama_sampler_free``) for ``params``.

    ``seed`` is a 32-bit seed other than 0xFFFFFFFF (llama.cpp's "pick one at random"); ``ban`` the tokens
    given no chance at all (the end-of-generation tokens when ``ignore_eos``); ``bias`` (token, value) pairs
    added to the logits first (the request's ``logit_bias``, -inf bans); ``n_ctx`` is what ``repeat_last_n``
    -1 means."""
    lc = llama_cpp
    chain = lc.llama_sampler_chain_init(lc.llama_sampler_chain_default_params())

    def add(sampler: object) -> None:
        lc.llama_sampler_chain_add(chain, sampler)

    pairs = [*((int(t), float("-inf")) for t in ban), *bias]
    if pairs:
        biases = (lc.llama_logit_bias * len(pairs))(*[lc.llama_logit_bias(t, v) for t, v in pairs])
        add(lc.llama_sampler_init_logit_bias(n_vocab, len(pairs), biases))  # copies the array
    last_n = n_ctx if params.repeat_last_n < 0 else params.repeat_last_n
    if last_n and (params.repeat_penalty != 1.0 or params.frequency_penalty or params.presence_penalty):
        add(lc.llama_sampler_init_penalties(n_vocab, last_n, float(params.repeat_penalty),
                                            float(params.frequency_penalty), float(params.presence_penalty)))
    temp = float(params.temperature)
    if temp <= 0.0:
        add(lc.llama_sampler_init_greedy())
    elif params.mirostat == 1:
        add(lc.llama_sampler_init_temp(temp))
        add(lc.llama_sampler_init_mirostat(n_vocab, seed, float(params.mirostat_tau), float(params.mirostat_eta),
                                           100))
    elif params.mirostat == 2:
        add(lc.llama_sampler_init_temp(temp))
        add(lc.llama_sampler_init_mirostat_v2(seed, float(params.mirostat_tau), float(params.mirostat_eta)))
    else:
        add(lc.llama_sampler_init_top_k(int(params.top_k)))
        add(lc.llama_sampler_init_typical(float(params.typical_p), 1))
        add(lc.llama_sampler_init_top_p(float(params.top_p), 1))
        add(lc.llama_sampler_init_min_p(float(params.min_p), 1))
        add(lc.llama_sampler_init_temp(temp))
        add(lc.llama_sampler_init_dist(seed))
    return chain


class Sampler:
    """The sampling state of one sequence: its chain and, for a grammar, its ``GrammarGuard``.

    Only the engine thread calls :meth:`sample`, right after the decode that produced the row ``idx``."""

    def __init__(self, params: TextParams, *, n_vocab: int, n_ctx: int, seed: int, eog: Sequence[int],
                 guard: GrammarGuard | None, bias: Sequence[tuple[int, float]] = ()):
        # With a guard, the guard applies ignore_eos itself (and must be able to let an end token through to
        # stop a generation its grammar cannot continue).
        ban = eog if params.ignore_eos and guard is None else ()
        self.chain = chain_for(params, n_vocab=n_vocab, n_ctx=n_ctx, seed=seed, ban=ban, bias=bias)
        self.guard = guard
        self.n_vocab = n_vocab
        self._last_n = n_ctx if params.repeat_last_n < 0 else params.repeat_last_n
        self._history: list[int] = []  # prompt + sampled tokens, for the guard (which counts what is new)
        # post_sampling_probs: after each sample, the (ids, probabilities) the chain left, most likely first
        self.keep_candidates = params.logprobs is not None and params.post_sampling_probs
        self.candidates: tuple[np.ndarray, np.ndarray] | None = None
        if guard is not None or self.keep_candidates:
            self._data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
            self._ids = np.arange(n_vocab, dtype=np.intc)

    def prime(self, prompt: Sequence[int]) -> None:
        """Let the chain see the prompt (penalties count its last tokens), before the first :meth:`sample`."""
        if self._last_n:
            for token in prompt[-self._last_n:]:
                llama_cpp.llama_sampler_accept(self.chain, int(token))
        if self.guard is not None:
            self._history = list(prompt)

    def sample(self, ctx: int, idx: int) -> int:
        """Sample (and accept) the next token from the logits of batch row ``idx``."""
        if self.guard is None and not self.keep_candidates:
            return int(llama_cpp.llama_sampler_sample(self.chain, ctx, idx))
        logits = llama_cpp.llama_get_logits_ith(ctx, idx)
        if not logits:
            raise RuntimeError(f"llama.cpp has no logits for batch row {idx}")
        scores = np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).copy()
        if self.guard is not None:
            scores = self.guard(self._history, scores)  # type: ignore[arg-type]  # it reads len() and slices
        data = self._data
        data["id"] = self._ids
        data["logit"] = scores
        data["p"] = 0.0
        array = llama_cpp.llama_token_data_array(
            data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=self.n_vocab, selected=-1, sorted=False)
        llama_cpp.llama_sampler_apply(self.chain, ctypes.byref(array))
        if not 0 <= array.selected < array.size:
            raise RuntimeError("the sampler chain selected no token")
        token = int(array.data[array.selected].id)
        if self.keep_candidates:
            self.candidates = self._left(array)
        llama_cpp.llama_sampler_accept(self.chain, token)
        if self.guard is not None:
            self._history.append(token)
        return token

    @staticmethod
    def _left(array: llama_cpp.llama_token_data_array) -> tuple[np.ndarray, np.ndarray]:
        """(ids, probabilities) of the candidates the chain left in ``array``, most likely first. The chain's
        last sampler set the probabilities (a random draw normalises what is left); greedy sets none, so
        then they are the softmax of what is left."""
        size = int(array.size)
        raw = np.ctypeslib.as_array(ctypes.cast(array.data, ctypes.POINTER(ctypes.c_ubyte)),
                                    shape=(size * _TOKEN_DATA.itemsize,))
        left = raw.view(_TOKEN_DATA)
        ids = left["id"].astype(np.intc)
        p = left["p"].astype(np.float64)
        total = float(p.sum())
        if not 0.99 < total < 1.01:
            logits = left["logit"].astype(np.float64)
            finite = np.isfinite(logits)
            p = np.zeros(size)
            if finite.any():
                e = np.exp(logits[finite] - logits[finite].max())
                p[finite] = e / e.sum()
        order = np.argsort(-p, kind="stable")
        return ids[order], p[order]

    def close(self) -> None:
        if self.chain:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = 0
        if self.guard is not None:
            self.guard.close()


class PieceDecoder:
    """Token ids to text, one token at a time: the bytes of a character that spans tokens are held until
    the character is complete (invalid bytes become U+FFFD)."""

    def __init__(self, vocab: int, special: bool = False):
        self._vocab = vocab
        self._special = special
        self._buf = ctypes.create_string_buffer(256)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def piece(self, token: int) -> bytes:
        """The bytes of ``token``; special tokens render as nothing (as in llama-cpp-python's text), or as
        their text (``<|im_end|>``) with ``special``."""
        n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, self._special)
        if n < 0:  # the buffer is too small: -n is what it needs
            self._buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, self._buf, len(self._buf), 0, self._special)
        return self._buf.raw[:max(0, n)]

    def feed(self, token: int) -> str:
        return self._utf8.decode(self.piece(token))

    def flush(self) -> str:
        """What is left at the end of the text (an incomplete character, as U+FFFD)."""
        return self._utf8.decode(b"", final=True)
