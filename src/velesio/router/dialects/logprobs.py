"""Token log-probabilities in each API's shape, from the entries a text job returns (``TextResult.probs``,
and each streamed piece's ``probs``): ``{"id", "token", "bytes", "logprob", "top": [{"id", "token",
"bytes", "logprob"}, ...]}`` per generated token, most likely alternative first.

- llama.cpp's ``completion_probabilities`` (``n_probs``): ``logprob`` / ``top_logprobs``, or, with
  ``post_sampling_probs``, ``prob`` / ``top_probs`` (alternatives of probability 0 left out, as llama.cpp
  does);
- OpenAI chat (``logprobs`` / ``top_logprobs``): ``{"content": [{"token", "logprob", "bytes",
  "top_logprobs": [...]}]}`` (llama.cpp's ``id`` kept as an extra key);
- OpenAI legacy completions (``logprobs: n``): ``{"tokens", "token_logprobs", "top_logprobs": [{token:
  logprob}], "text_offset"}``, plus the chat form under ``content``, which llama.cpp's server answers there.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from velesio.mesh.params import LOGPROB_FLOOR


def _bytes(entry: Mapping[str, Any]) -> list[int]:
    raw = entry.get("bytes")
    if isinstance(raw, (bytes, bytearray)):
        return list(raw)
    return list(str(entry.get("token", "")).encode())


def _logprob(entry: Mapping[str, Any]) -> float:
    value = entry.get("logprob")
    return float(value) if isinstance(value, (int, float)) and value > LOGPROB_FLOOR else LOGPROB_FLOOR


def _prob(entry: Mapping[str, Any]) -> float:
    lp = _logprob(entry)
    return 0.0 if lp <= LOGPROB_FLOOR else math.exp(lp)


def _entries(probs: Iterable[Any] | None) -> list[Mapping[str, Any]]:
    return [e for e in probs or () if isinstance(e, Mapping)]


def _top(entry: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return _entries(entry.get("top"))


# ---- llama.cpp ---------------------------------------------------------------------------------------
def llamacpp(probs: Iterable[Any] | None, post_sampling: bool) -> list[dict[str, Any]]:
    """llama.cpp's ``completion_probabilities``."""
    out = []
    for entry in _entries(probs):
        if post_sampling:
            top = [{"id": t.get("id"), "token": t.get("token", ""), "bytes": _bytes(t), "prob": _prob(t)}
                   for t in _top(entry)]
            out.append({"id": entry.get("id"), "token": entry.get("token", ""), "bytes": _bytes(entry),
                        "prob": _prob(entry), "top_probs": [t for t in top if t["prob"] > 0.0]})
        else:
            out.append({"id": entry.get("id"), "token": entry.get("token", ""), "bytes": _bytes(entry),
                        "logprob": _logprob(entry),
                        "top_logprobs": [{"id": t.get("id"), "token": t.get("token", ""), "bytes": _bytes(t),
                                          "logprob": _logprob(t)} for t in _top(entry)]})
    return out


# ---- OpenAI ------------------------------------------------------------------------------------------
def _chat_token(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": entry.get("id"), "token": entry.get("token", ""), "logprob": _logprob(entry),
            "bytes": _bytes(entry)}


def chat(probs: Iterable[Any] | None) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object."""
    return {"content": [{**_chat_token(e), "top_logprobs": [_chat_token(t) for t in _top(e)]}
                        for e in _entries(probs)], "refusal": None}


def completion(probs: Iterable[Any] | None, offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy completions ``logprobs`` object; ``offset`` is where these tokens' text starts in the
    whole completion (a stream's later chunks)."""
    entries = _entries(probs)
    tokens, offsets, top = [], [], []
    for e in entries:
        token = str(e.get("token", ""))
        tokens.append(token)
        offsets.append(offset)
        offset += len(token)
        alternatives: dict[str, float] = {}
        for t in _top(e):
            alternatives.setdefault(str(t.get("token", "")), _logprob(t))
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": [_logprob(e) for e in entries], "top_logprobs": top,
            "text_offset": offsets, "content": chat(entries)["content"]}
