"""How a plugin author tests a backend: in-process with velesio.testing, no router, no worker.

Run from the plugin's folder with ``pytest tests`` once velesio and this plugin are installed (or from a
Velesio checkout, where the plugin's source folder is used when it is not installed).
"""

from __future__ import annotations

import os
import sys

from velesio.backends import TextParams, TextResult
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
    assert isinstance(run.result, TextResult)
    assert run.result.text == run.text == "three two one"
    assert [c["text"] for c in run.chunks] == ["three", " two", " one"]
    assert run.tokens == [0, 1, 2]
    assert (run.result.finish_reason, run.result.stop_type) == ("stop", "eos")
    assert run.result.completion_tokens == 3


def test_max_tokens():
    run = run_backend(EchoBackend, completion("a b c d e", max_tokens=2))
    assert run.text == run.result.text == "e d"
    assert (run.result.finish_reason, run.result.stop_type) == ("length", "limit")
    assert run_backend(EchoBackend, completion("a b c", max_tokens=0)).text == ""


def test_stop_string_is_never_streamed():
    # "c b" spans two pieces: " c" is held back until " b" shows it is the stop string.
    run = run_backend(EchoBackend, completion("a b c d e", stop=["c b"]))
    assert run.text == run.result.text == "e d "
    assert all("c" not in c["text"] for c in run.chunks)
    assert (run.result.finish_reason, run.result.stop_type, run.result.stopping_word) == \
        ("stop", "word", "c b")
    # held-back text that turns out not to be a stop string is streamed after all, with its token ids
    run = run_backend(EchoBackend, completion("a b c d e", stop=["c x"]))
    assert run.text == "e d c b a" and run.result.stop_type == "eos"
    assert sorted(run.tokens) == [0, 1, 2, 3, 4]


def test_resume_text_continues_after_what_was_streamed():
    # An earlier attempt streamed "e d" then its worker died: the router sends it as resume_text and lowers
    # max_tokens by the tokens already counted.
    run = run_backend(EchoBackend, completion("a b c d e", resume_text="e d", max_tokens=2))
    assert run.text == run.result.text == " c b"
    assert run.tokens == [2, 3]
    assert run.result.finish_reason == "length"
    # cut inside a word: only the rest of it follows
    run = run_backend(EchoBackend, completion("alpha beta", resume_text="beta al"))
    assert run.text == "pha" and run.result.finish_reason == "stop"


def test_resume_text_at_every_cut_never_repeats_nor_skips():
    # Wherever the earlier attempt stopped, even inside a word or after a space, this one streams exactly the rest.
    full = run_backend(EchoBackend, completion("alpha beta gamma delta")).text
    assert full == "delta gamma beta alpha"
    for cut in range(len(full) + 1):
        run = run_backend(EchoBackend, completion("alpha beta gamma delta", resume_text=full[:cut]))
        assert run.ok and run.text == run.result.text == full[cut:], cut


def test_stop_across_the_resume_point():
    # The first attempt's worker dies after n chunks (a cancel stands in for it here): it streamed "e", " d",
    # then " " ("c" is held back: it could start the stop string "c b"). Whatever it streamed, the next attempt
    # continues after it and still ends at the stop string, never streaming any of it.
    whole = run_backend(EchoBackend, completion("a b c d e", stop=["c b"]))
    assert whole.text == "e d " and whole.result.stopping_word == "c b"
    for n, streamed in ((1, "e"), (2, "e d"), (3, "e d ")):
        first = run_backend(EchoBackend, completion("a b c d e", stop=["c b"]), cancel_after=n)
        assert first.code == "cancelled" and first.text == streamed
        rest = run_backend(EchoBackend, completion("a b c d e", stop=["c b"], resume_text=first.text))
        assert first.text + rest.text == whole.text and rest.text == rest.result.text
        assert (rest.result.stop_type, rest.result.stopping_word) == ("word", "c b")


def test_typed_params():
    # A job's params may be given typed, as a backend receives them; a dict gets the mesh's defaults.
    run = run_backend(EchoBackend, {"op": "completion", "params": TextParams(prompt="x y", max_tokens=1)})
    assert run.text == "y" and run.job.params == TextParams(prompt="x y", max_tokens=1)
    assert run_backend(EchoBackend, completion("x y")).job.params == TextParams(prompt="x y")


def test_cancel():
    run = run_backend(EchoBackend, completion("a b c d e"), cancel_after=2)
    assert run.cancelled and not run.ok
    assert run.code == "cancelled"
    assert run.text == "e d"
