"""A GBNF grammar applied from Python, one step at a time, so that llama.cpp is never handed a token the
grammar does not allow.

llama.cpp's grammar sampler throws (uncaught, so the process aborts) when it accepts a token the grammar
does not allow, and aborts outright when it accepts an end-of-generation token while the grammar is
incomplete. Inside llama-cpp-python's sampler chain (``create_completion(grammar=...)``) the chosen token is
accepted natively, so a request whose constraints leave no token allowed took the whole worker down: a
grammar that is complete while ``ignore_eos`` bans ending, or a grammar no token can match.

Here the grammar sampler sits outside the chain. :class:`GrammarGuard` is a logits processor: at each step
it accepts the token sampled at the previous step (only if it had allowed it), masks the scores with the
grammar, and applies ``ignore_eos``. When no token is left allowed it records why and lets only an
end-of-generation token through, so generation stops at once and the backend answers 400 with
:attr:`GrammarGuard.error`. The grammar's work per token is llama.cpp's own apply over the vocabulary, as
in the chain; the copies around it are a few numpy passes over one row of scores.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import llama_cpp
import numpy as np

from velesio.mesh.params import TextParams

# llama_token_data as numpy sees it (the layout llama-cpp-python's own custom samplers use).
_TOKEN_DATA = np.dtype([("id", np.intc), ("logit", np.single), ("p", np.single)], align=True)


class GrammarGuard:
    """One grammar for one generation. Call it as a logits processor; read :attr:`error` afterwards."""

    def __init__(self, model, grammar: str, field: str, eog: Sequence[int], eos: int, ignore_eos: bool,
                 root: str = "root"):
        """``model`` is llama-cpp-python's ``llama_model_p``; ``field`` names the request field in errors.
        Raises ValueError when llama.cpp cannot parse the grammar."""
        vocab = llama_cpp.llama_model_get_vocab(model)
        self._sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar.encode(), root.encode())
        if not self._sampler:
            raise ValueError("llama.cpp could not parse it")
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        self._data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
        self._data["id"] = np.arange(n_vocab, dtype=np.intc)
        self._array = llama_cpp.llama_token_data_array(
            data=self._data.ctypes.data_as(llama_cpp.llama_token_data_p), size=n_vocab, selected=-1, sorted=False)
        self._field = field
        self._eog = np.asarray(list(eog), dtype=np.intp)
        # The token that ends a generation we must stop: llama-cpp-python ends on any end-of-generation token.
        self._end = eos if eos in set(eog) or not len(self._eog) else int(self._eog[0])
        self._ignore_eos = ignore_eos
        self._allowed = np.zeros(n_vocab, dtype=bool)  # what the last step let through
        self._seen: int | None = None  # tokens of input_ids already accounted for
        self.generated = 0
        self.error: str | None = None

    def check_start(self) -> None:
        """Raise ValueError, with the message a client should see, when no text at all can be generated:
        the grammar allows no token at the start (and cannot end there), or only ending while ignore_eos
        forbids it. Costs one pass of the grammar over the vocabulary; leaves the grammar as it was."""
        if self._mask(np.zeros(len(self._data), dtype=np.single)) is None:
            raise ValueError(self.error)

    def __call__(self, input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
        n = len(input_ids)
        if self._seen is None:
            self._seen = n  # the prompt
        elif self.error is None:
            for token in input_ids[self._seen:n]:  # the token sampled at the previous step
                token = int(token)
                if not (0 <= token < len(self._allowed) and self._allowed[token]):
                    # Cannot happen with the samplers llama-cpp-python chains after this one (they only
                    # narrow the candidates); refuse rather than hand llama.cpp a token it would abort on.
                    self.error = (f"{self._field}: sampling chose token {token}, which the grammar does "
                                  "not allow; generation stopped")
                    break
                llama_cpp.llama_sampler_accept(self._sampler, token)
                self.generated += 1
            self._seen = n
        masked = self._mask(scores) if self.error is None and self._sampler else None
        if masked is None:
            # Nothing may follow: let only the end token through, so generation stops here.
            self._allowed[:] = False
            scores[:] = -np.inf
            scores[self._end] = 0.0
            return scores
        scores[:] = masked
        return scores

    def _mask(self, scores: np.ndarray) -> np.ndarray | None:
        """The scores with -inf for every token the grammar (and ignore_eos) refuses; None, with
        :attr:`error` set, when that leaves nothing."""
        data = self._data
        data["logit"] = scores
        self._array.size, self._array.selected, self._array.sorted = len(data), -1, False
        llama_cpp.llama_sampler_apply(self._sampler, ctypes.byref(self._array))
        logits = data["logit"]
        allowed = ~np.isneginf(logits)
        may_end = bool(allowed[self._eog].any()) if len(self._eog) else False
        if self._ignore_eos and len(self._eog):
            allowed[self._eog] = False
            logits[self._eog] = -np.inf
        if not allowed.any():
            if may_end:
                self.error = (f"{self._field}: the grammar is complete but ignore_eos forbids ending the text "
                              f"(tokens generated: {self.generated})")
            elif self.generated == 0:
                self.error = f"{self._field}: no text matches the grammar (no token of the model can start it)"
            else:
                self.error = (f"{self._field}: no text matches the grammar: no token of the model can continue "
                              f"it and it is not complete (tokens generated: {self.generated})")
            return None
        self._allowed = allowed
        return logits

    def close(self) -> None:
        if getattr(self, "_sampler", None):
            llama_cpp.llama_sampler_free(self._sampler)
            self._sampler = None

    def __del__(self) -> None:
        self.close()


def guard_for(model: int, params: TextParams, eog: Sequence[int], eos: int) -> GrammarGuard:
    """The job's grammar (or JSON schema) as a GrammarGuard over ``model``, checked once against the whole
    vocabulary: InvalidRequest (400) for a grammar llama.cpp cannot parse, and for one that no text can
    satisfy from the start."""
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from velesio.backends import InvalidRequest

    field = "grammar" if params.grammar else "json_schema"
    try:
        text = params.grammar or json_schema_to_gbnf(json.dumps(params.json_schema))
        guard = GrammarGuard(model, text, field, eog, eos, bool(params.ignore_eos))
    except Exception as exc:
        raise InvalidRequest(f"{field}: cannot be compiled: {exc}") from None
    try:
        guard.check_start()
    except ValueError as exc:
        guard.close()
        raise InvalidRequest(str(exc)) from None
    return guard
