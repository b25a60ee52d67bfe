"""Helpers for text backends: stop sequences that span token boundaries, the plain chat rendering of a model
without a chat template, chat-template names, and the context llama.cpp gives Jinja templates.
``StopMatcher`` and ``render_plain_chat`` are re-exported by ``velesio.backends`` for plugins."""

from __future__ import annotations

import time
from typing import Any

# A model without a chat template continues after "assistant:"; it has finished its turn where it starts
# another one.
PLAIN_CHAT_STOPS = ("\nuser:", "\nsystem:")


def render_plain_chat(messages: Any) -> tuple[str, list[str]]:
    """The chat fallback of a model without a chat template: ``(prompt, stops)``.

    ``[{"role": "user", "content": "Hi"}]`` -> ``("user: Hi\\nassistant:", ["\\nuser:", "\\nsystem:"])``: one
    ``role: content`` line per message, then ``assistant:``; generation should also stop at the returned stop
    strings (a new turn), reported as the stopping word. OpenAI content parts keep their text parts. Raises
    ``InvalidRequest`` when ``messages`` is not a non-empty list of messages with a role.
    """
    from velesio.backends import InvalidRequest  # here: velesio.backends imports this module

    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("chat needs a non-empty list of messages")
    lines = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise InvalidRequest("each message needs a role and a content")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        lines.append(f"{m['role']}: {content or ''}\n")
    return "".join(lines) + "assistant:", list(PLAIN_CHAT_STOPS)


class StopMatcher:
    """Feed generated pieces; get back the text that is safe to show and, once found, the stop word.

    Text that could be the start of a stop sequence is held back until it is known not to be one, so
    a stop word is never streamed and is excluded from the result (llama.cpp and OpenAI behaviour).
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped: str | None = None

    def feed(self, piece: str) -> str:
        if self.stopped is not None:
            return ""
        self.pending += piece
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        first = None
        for stop in self.stops:
            idx = self.pending.find(stop)
            if idx != -1 and (first is None or idx < first[0]):
                first = (idx, stop)
        if first is not None:
            self.stopped = first[1]
            out, self.pending = self.pending[: first[0]], ""
            return out
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped is not None else self.pending), ""
        return out


# LLM for Unity's template names (v2 /template), recognised from a model's Jinja chat template.
_TEMPLATE_MARKERS = [
    ("<|im_start|>", "chatml"),
    ("<start_of_turn>", "gemma"),
    ("<|start_header_id|>", "llama3 chat"),
    ("<|user|>", "phi-3"),
    ("<｜User｜>", "deepseek-v3"),
    ("[INST]", "mistral instruct"),
    ("### Instruction", "alpaca"),
    ("USER:", "vicuna"),
]


def template_name(chat_template: str | None) -> str:
    """The LLM for Unity template name closest to a Jinja chat template (chatml when unknown)."""
    for marker, name in _TEMPLATE_MARKERS:
        if chat_template and marker in chat_template:
            return name
    return "chatml"


def extra_context() -> dict[str, str]:
    """What llama.cpp's server gives every Jinja chat template besides the messages: today's date, as
    ``date_string`` ("02 Dec 2026": Llama 3's templates print it, else their own fixed date) and ``datetime``
    ("Dec 02 2026": firefunction's)."""
    now = time.localtime()
    return {"date_string": time.strftime("%d %b %Y", now), "datetime": time.strftime("%b %d %Y", now)}
