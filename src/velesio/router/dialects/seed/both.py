"""A POST /completion body that names no field only llama.cpp knows may come from a seed client or from a
llama.cpp client that sent only ``prompt`` and common sampling fields. Its answer is the seed's shape with
llama.cpp's keys beside it (``content``, ``stop``, ``tokens_predicted``, ``timings`` ...), so that both read
it: the two shapes share no key but ``model``, which they give the same value. A stream's events carry both
too (llama.cpp clients stop at the event with ``stop: true`` or at ``[DONE]``); errors take the seed's
shape."""

from __future__ import annotations

from typing import Any

from velesio.mesh.params import TextResult

from ...errors import ApiError
from ..llamacpp import LlamaCppText
from .openai import OpenAIText


def _merge(seed: list[dict[str, Any]], llama: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seed's events, the first of them with llama.cpp's event's keys added (the seed's win)."""
    if not seed or not llama:
        return seed
    return [{**llama[0], **seed[0]}, *seed[1:]]


class BothShapes:
    done_marker = True

    def __init__(self, seed: OpenAIText, llama: LlamaCppText):
        self.seed, self.llama = seed, llama

    def render(self, result: TextResult) -> dict[str, Any]:
        return {**self.llama.render(result), **self.seed.render(result)}

    def start(self) -> list[dict[str, Any]]:
        return self.seed.start()

    def chunk(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        return _merge(self.seed.chunk(chunk), self.llama.chunk(chunk))

    def end(self, result: TextResult) -> list[dict[str, Any]]:
        return _merge(self.seed.end(result), self.llama.end(result))

    def error(self, err: ApiError) -> list[dict[str, Any]]:
        return self.seed.error(err)
