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
from collections.abc import Sequence


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
