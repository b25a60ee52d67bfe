"""Cache-aware routing: which workers recently served which prompt prefixes, per model.

LLM for Unity and every chat client resend the whole conversation each turn, so the worker that served
turn N holds turn N+1's prefix in its KV cache. The router keeps an approximate index of that (the way
SGLang's router keeps a radix tree): a prompt's text is cut into blocks of ``BLOCK`` characters, each
block is hashed together with everything before it, and each hash remembers the workers that were sent a
prompt with that prefix and when. Matching a new prompt walks its blocks until no worker has the next one.

The key is the text a backend turns into tokens: a completion's prompt, or a chat's messages in order
(role and content), which grows turn after turn exactly as the rendered chat prompt does — never just the
first message, which every conversation of a game shares. Memory is bounded (``max_blocks``, least recently
used first); a worker's entries go when it leaves the mesh.
"""

from __future__ import annotations

import collections

from velesio.mesh.params import Params, TextParams

# A key's blocks: ((model, chained hash), the block's end in the key), in order.
Prefixes = list[tuple[tuple[str, int], int]]

BLOCK = 64  # characters per block: a turn's new text is matched to within this much
MAX_BLOCKS = 200_000  # per router, all models together (a few tens of MB at most)


def prompt_key(op: str, params: Params) -> str | None:
    """The text whose prefix a worker may have cached, or None for jobs that do not generate text."""
    if not isinstance(params, TextParams):
        return None
    if op == "chat":
        return "".join(f"\x1e{m.get('role', '')}\x1f{m.get('content') or ''}" for m in params.messages)
    return params.prompt


class PrefixIndex:
    def __init__(self, max_blocks: int = MAX_BLOCKS, block: int = BLOCK):
        self.max_blocks = max_blocks
        self.block = block
        # (model, chained hash) -> {worker name: last use (a counter)}; ordered by last use
        self._blocks: collections.OrderedDict[tuple[str, int], dict[str, int]] = collections.OrderedDict()
        self._uses = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def prefixes(self, model: str, key: str) -> Prefixes:
        """``key``'s chained block hashes and where each block ends: computed once per job, then matched and
        recorded as often as the job is placed."""
        out: Prefixes = []
        h = 0
        for start in range(0, len(key), self.block):
            h = hash((h, key[start:start + self.block]))
            out.append(((model, h), min(len(key), start + self.block)))
        return out

    def match(self, model: str, key: str | Prefixes) -> dict[str, int]:
        """worker name -> how many leading characters of ``key`` (or of the key of ``prefixes``) it was sent
        recently."""
        matched: dict[str, int] = {}
        alive: set[str] | None = None
        for h, end in self.prefixes(model, key) if isinstance(key, str) else key:
            holders = self._blocks.get(h)
            if not holders:
                break
            alive = set(holders) if alive is None else alive & holders.keys()
            if not alive:
                break
            for name in alive:
                matched[name] = end
        return matched

    def record(self, model: str, key: str | Prefixes, worker: str) -> None:
        """``worker`` was sent a prompt of ``key`` (or of the key of ``prefixes``)."""
        self._uses += 1
        for h, _end in self.prefixes(model, key) if isinstance(key, str) else key:
            holders = self._blocks.get(h)
            if holders is None:
                holders = self._blocks[h] = {}
            else:
                self._blocks.move_to_end(h)
            holders[worker] = self._uses
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)

    def drop_worker(self, worker: str) -> None:
        """Forget what a worker that left held (its cache is gone)."""
        for h in [h for h, holders in self._blocks.items() if worker in holders]:
            holders = self._blocks[h]
            del holders[worker]
            if not holders:
                del self._blocks[h]
