"""How a plugin author tests a backend: in-process with velesio.testing, no router, no worker.

Run from the plugin's folder with ``pytest tests`` once velesio and this plugin are installed (or from a
Velesio checkout, where the plugin's source folder is used when it is not installed).
"""

from __future__ import annotations

import os
import sys

from velesio.testing import run_backend

try:
    from velesio_example_echo import EchoBackend
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from velesio_example_echo import EchoBackend


def completion(prompt: str, **params) -> dict:
    return {"op": "completion", "params": {"prompt": prompt, **params}}


def test_echoes_reversed_word_by_word():
    chat = {"op": "chat", "params": {"messages": [{"role": "user", "content": "one two three"}]}}
    run = run_backend(EchoBackend, chat)
    assert run.ok, run.message
    assert run.result["text"] == run.text == "three two one"
    assert [c["text"] for c in run.chunks] == ["three", " two", " one"]
    assert run.tokens == [0, 1, 2]
    assert (run.result["finish_reason"], run.result["stop_type"]) == ("stop", "eos")
    assert run.result["completion_tokens"] == 3


def test_max_tokens():
    run = run_backend(EchoBackend, completion("a b c d e", max_tokens=2))
    assert run.text == run.result["text"] == "e d"
    assert (run.result["finish_reason"], run.result["stop_type"]) == ("length", "limit")
    assert run_backend(EchoBackend, completion("a b c", max_tokens=0)).text == ""


def test_stop_string_is_never_streamed():
    # "c b" spans two pieces: " c" is held back until " b" shows it is the stop string.
    run = run_backend(EchoBackend, completion("a b c d e", stop=["c b"]))
    assert run.text == run.result["text"] == "e d "
    assert all("c" not in c["text"] for c in run.chunks)
    assert (run.result["finish_reason"], run.result["stop_type"], run.result["stopping_word"]) == \
        ("stop", "word", "c b")
    # held-back text that turns out not to be a stop string is streamed after all, with its token ids
    run = run_backend(EchoBackend, completion("a b c d e", stop=["c x"]))
    assert run.text == "e d c b a" and run.result["stop_type"] == "eos"
    assert sorted(run.tokens) == [0, 1, 2, 3, 4]


def test_resume_text_continues_after_what_was_streamed():
    # An earlier attempt streamed "e d" then its worker died: the router sends it as resume_text and lowers
    # max_tokens by the tokens already counted.
    run = run_backend(EchoBackend, completion("a b c d e", resume_text="e d", max_tokens=2))
    assert run.text == run.result["text"] == " c b"
    assert run.tokens == [2, 3]
    assert run.result["finish_reason"] == "length"
    # cut inside a word: only the rest of it follows
    run = run_backend(EchoBackend, completion("alpha beta", resume_text="beta al"))
    assert run.text == "pha" and run.result["finish_reason"] == "stop"


def test_cancel():
    run = run_backend(EchoBackend, completion("a b c d e"), cancel_after=2)
    assert run.cancelled and not run.ok
    assert run.code == "cancelled"
    assert run.text == "e d"
