"""The engine's sequences and its prefix cache: which idle sequence a new job takes, and how much of the
prompt that sequence already holds.

Each sequence remembers the tokens whose keys and values are in its part of the KV cache (positions 0 to
``len(tokens) - 1``). A finished job leaves its tokens there, so the sequence is a cache entry until it is
taken again. A new job takes the idle sequence that shares the longest prefix with its prompt, keeps that
prefix and evaluates only the rest; when no idle sequence shares anything, or the job asked for a fresh
evaluation, it takes the least recently used one (LRU eviction). Pure Python: no llama.cpp here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence


@dataclasses.dataclass(eq=False)
class Slot:
    """One llama.cpp sequence (``seq_id``) and what its KV cache holds."""

    seq_id: int
    tokens: list[int] = dataclasses.field(default_factory=list)  # in the KV cache, by position
    busy: bool = False
    last_used: int = 0  # the engine's tick when its last job ended (LRU order); 0: never used


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    # Compare in blocks first: prompts share long prefixes (a chat's history), and a slice comparison is a
    # C loop where a Python loop per token is not.
    step = 64
    while i + step <= n and list(a[i:i + step]) == list(b[i:i + step]):
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


# A sequence whose cached tokens a new prompt shares only in part is another conversation's (they share a
# system prompt, say): the new job takes it only when that costs at most this many of its cached tokens, or
# when the prompt is (almost) all in it (a regenerated or shortened turn: what it held is being replaced).
KEEP_OTHERS = 16
ALMOST_ALL = 4


def pick_slot(slots: Sequence[Slot], prompt: Sequence[int], reuse: bool) -> tuple[Slot, int] | None:
    """The idle slot a job with ``prompt`` should take, and how many of its cached tokens it keeps; None
    when every slot is busy.

    With ``reuse``: the slot sharing the longest prefix with the prompt (ties: the least recently used), and
    that prefix, but always at least one prompt token left to evaluate (the logits that sample the first
    token come from evaluating the prompt's last token) — provided that slot's cache is this conversation's:
    the prompt continues (nearly) all of it, or is (nearly) all in it. Otherwise the job is a new
    conversation that merely shares a beginning with a cached one, and evicts the least recently used slot
    (an empty one first) rather than that conversation, keeping what the evicted slot shares with it.
    Without ``reuse``: the least recently used slot, keeping nothing."""
    idle = [s for s in slots if not s.busy]
    if not idle:
        return None
    if not reuse:
        return min(idle, key=lambda s: s.last_used), 0
    best = max(idle, key=lambda s: (common_prefix(s.tokens, prompt), -s.last_used))
    shared = common_prefix(best.tokens, prompt)
    if shared and (len(best.tokens) - shared > KEEP_OTHERS and len(prompt) - shared > ALMOST_ALL):
        best = min(idle, key=lambda s: (bool(s.tokens), s.last_used))
        shared = common_prefix(best.tokens, prompt)
    return best, max(0, min(shared, len(prompt) - 1))


# Copying another sequence's KV moves that sequence's whole stream (llama.cpp copies across streams whole), so a
# copy is made only where it saves evaluating at least this many prompt tokens.
MIN_COPY = 32


def pick_donor(slots: Sequence[Slot], taker: Slot, prompt: Sequence[int], keep: int,
               upcoming: Mapping[int, Sequence[int]]) -> tuple[Slot, int, bool] | None:
    """Another sequence whose KV holds, or will soon hold, a longer prefix of ``prompt`` than the ``keep``
    tokens the ``taker`` slot keeps of its own: (that slot, how many tokens to copy, whether they are in its
    cache already); None when no copy saves ``MIN_COPY`` tokens.

    ``upcoming`` maps the sequence id of a job still evaluating its prompt to that prompt: a job sent beside
    another with the same prompt (the choices of one request, or players sharing a long system prompt) waits
    for that evaluation and copies it instead of repeating it. At least one prompt token is always left to
    evaluate (its logits sample the first token)."""
    best: tuple[int, bool, Slot] | None = None
    cap = len(prompt) - 1
    for slot in slots:
        if slot is taker:
            continue
        now = min(common_prefix(slot.tokens, prompt), cap)
        later = min(common_prefix(upcoming[slot.seq_id], prompt), cap) if slot.seq_id in upcoming else 0
        gain, ready = (now, True) if now >= later else (later, False)
        if best is None or (gain, ready) > best[:2]:
            best = (gain, ready, slot)
    if best is None or best[0] < keep + MIN_COPY:
        return None
    return best[2], best[0], best[1]
