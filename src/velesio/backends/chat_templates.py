"""A llama-cpp model's chat template when the operator overrides the GGUF's own (llama-server's
``--chat-template`` and ``--chat-template-file``): ``options.chat_template`` names one of llama.cpp's built-in
templates (``llama3``, ``chatml``, ``command-r``, ... rendered by llama.cpp's ``llama_chat_apply_template``) or
holds a Jinja template's source; ``options.chat_template_file`` is the path of a Jinja template file.

Import inside a backend's ``load()``: it imports llama_cpp.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import llama_cpp

MAX_TEMPLATE_BYTES = 1 << 20  # a chat template file larger than this is not a chat template
SAMPLE_CHAT = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]  # to recognise a template by


def builtin_names() -> list[str]:
    """The names of llama.cpp's built-in chat templates."""
    n = int(llama_cpp.llama_chat_builtin_templates(None, 0))
    names = (ctypes.c_char_p * n)()
    llama_cpp.llama_chat_builtin_templates(names, n)
    return [bytes(name).decode() for name in names if name]


def template_option(options: Mapping[str, Any], model: str) -> str | None:
    """The template the options ask for instead of the GGUF's: a built-in name or Jinja source; None when they
    ask for none. ValueError for both options at once, an unreadable or oversized file, or a string that is
    neither a built-in name nor a Jinja template."""
    text, path = options.get("chat_template"), options.get("chat_template_file")
    if text is not None and path is not None:
        raise ValueError(f"model {model}: options.chat_template or options.chat_template_file, not both")
    if path is not None:
        if not isinstance(path, str) or not os.path.isfile(path):
            raise ValueError(f"model {model}: options.chat_template_file: no such file: {path!r}")
        if os.path.getsize(path) > MAX_TEMPLATE_BYTES:
            raise ValueError(f"model {model}: options.chat_template_file is over {MAX_TEMPLATE_BYTES} bytes")
        with open(path, encoding="utf-8") as f:
            return f.read()
    if text is None:
        return None
    # As llama-server: a name it does not know is Jinja source (plain text is a template that renders as
    # itself), except a lone word, which is a misspelt name rather than a template
    if not isinstance(text, str) or (text not in builtin_names() and re.fullmatch(r"[\w.-]*", text)):
        raise ValueError(f"model {model}: options.chat_template: one of llama.cpp's built-in templates "
                         f"({', '.join(builtin_names())}) or a Jinja template, not {text!r}")
    return text


class BuiltinTemplate:
    """One of llama.cpp's built-in templates, rendered by llama.cpp itself."""

    def __init__(self, name: str):
        self.name = name

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True) -> str:
        # The router checked the messages: each a role and a string content.
        chat = (llama_cpp.llama_chat_message * len(messages))()
        keep = []  # the encoded strings, alive while llama.cpp reads them
        for i, message in enumerate(messages):
            role, content = str(message.get("role", "")).encode(), str(message.get("content") or "").encode()
            keep += [role, content]
            chat[i].role, chat[i].content = role, content
        size = 1024 + 2 * sum(len(b) for b in keep)
        while True:
            buf = ctypes.create_string_buffer(size)
            n = int(llama_cpp.llama_chat_apply_template(self.name.encode(), chat, len(messages),
                                                        add_generation_prompt, buf, size))
            if n < 0:
                raise ValueError(f"llama.cpp's {self.name} template cannot render these messages")
            if n <= size:
                return buf.raw[:n].decode(errors="replace")
            size = n + 1
