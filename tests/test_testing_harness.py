"""velesio.testing's in-process backend harness, and the error codes a backend may raise (ERROR_CODES): what
the harness reports is what a backend process sends the router."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest

import velesio.backends as backends
from velesio.backends import (
    Backend,
    BackendError,
    JobContext,
    ModelConfig,
    StopMatcher,
    TextParams,
    TextResult,
    TokenizeParams,
    TokenizeResult,
    render_plain_chat,
)
from velesio.backends.benchmark import BenchmarkBackend
from velesio.mesh import codec
from velesio.mesh.jobs import Job
from velesio.mesh.params import to_wire
from velesio.mesh.protocol import ERROR_CODES, Command
from velesio.testing import BackendRun, load_backend, run_backend

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins" / "example-echo"))
from velesio_example_echo import EchoBackend  # noqa: E402 - the plugin's source folder, installed or not


class OddCode(BackendError):
    code = "quota_exceeded"  # not one of ERROR_CODES


class Failing(Backend):
    """Streams one piece, then fails the way the prompt (or the content to tokenize) says."""

    name = "failing"
    kind = "text"
    operations = ("completion", "tokenize")
    loads = 0

    def load(self) -> dict[str, Any]:
        type(self).loads += 1
        return {"n_ctx": 64}

    def run(self, job: Job, ctx: JobContext) -> Any:
        p = job.params
        if isinstance(p, TokenizeParams):
            return TokenizeResult(tokens=(1, 2))  # a tuple: msgpack delivers a list
        assert isinstance(p, TextParams)
        ctx.emit({"text": "so far", "tokens": [7]})
        if p.prompt == "odd":
            raise OddCode("the quota of this account is spent")
        if p.prompt == "bug":
            raise KeyError("oops")
        if p.prompt == "unsendable":
            return TextResult(text="so far", stopping_word=object())  # type: ignore[arg-type]
        if p.prompt == "dict":  # an API 1 result
            return {"text": "so far"}
        return TextResult(text="so far", completion_tokens=1)


def completion(prompt: str = "x", **params: Any) -> dict[str, Any]:
    return {"op": "completion", "params": {"prompt": prompt, **params}}


# -- the public surface ------------------------------------------------------------------------------------


def test_backends_exports_the_plugin_kit():
    for name in ("StopMatcher", "render_plain_chat", "ERROR_CODES"):
        assert name in backends.__all__ and hasattr(backends, name)
    m = StopMatcher(["</s>"])
    assert m.feed("ab<") + m.feed("/s>cd") + m.flush() == "ab" and m.stopped == "</s>"


def test_render_plain_chat_is_the_one_fallback():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    assert render_plain_chat(msgs) == ("system: Be brief.\nuser: Hi\nassistant:", ["\nuser:", "\nsystem:"])
    with pytest.raises(backends.InvalidRequest):
        render_plain_chat([])
    from velesio.backends.ctransformers import CHAT_STOPS, render_chat
    assert render_chat(msgs) == render_plain_chat(msgs)[0] and list(CHAT_STOPS) == render_plain_chat(msgs)[1]
    from velesio.backends.llama import LlamaCppBackend  # importable without llama_cpp; nothing loaded here
    llama = LlamaCppBackend(ModelConfig("m", "llama-cpp"))
    llama._formatter = None  # a GGUF without a chat template
    assert llama._render_chat(msgs) == render_plain_chat(msgs)


def test_error_codes_are_codes_the_router_knows():
    from velesio.router.errors import CODES
    assert set(ERROR_CODES) <= set(CODES)
    for cls in (BackendError, backends.InvalidRequest, backends.NotSupported, backends.ContextExceeded,
                backends.Cancelled):
        assert cls.code in ERROR_CODES
    assert backends.reported_code(OddCode("x")) == "internal_error"
    assert backends.reported_code(ValueError("x")) == "internal_error"
    assert backends.reported_code(backends.ContextExceeded("x")) == "context_exceeded"


# -- the harness on the benchmark backend ----------------------------------------------------------------


def test_benchmark_backend_streams_through_the_harness():
    run = run_backend(BenchmarkBackend, completion(max_tokens=3))
    assert isinstance(run, BackendRun) and run.ok
    assert run.text == run.result.text == " tok tok tok"
    assert len(run.chunks) == 3 and run.tokens == []  # no token ids: each chunk counts as one
    assert run.job.model == "benchmark-test" and run.job.params == TextParams(prompt="x", max_tokens=3)
    assert isinstance(run.job.params, TextParams) and run.job.params.temperature == TextParams().temperature
    # not streamed: the fixed reply, no chunks
    run = run_backend(BenchmarkBackend, {**completion(max_tokens=3), "stream": False},
                      config=ModelConfig("bench", "benchmark", options={"reply": "pong"}))
    assert run.chunks == [] and isinstance(run.result, TextResult) and run.result.text == "pong"
    assert run.job.model == "bench"


def test_benchmark_backend_cancelled():
    run = run_backend(BenchmarkBackend, completion(max_tokens=50), cancel_after=5)
    assert run.cancelled and not run.ok and run.result is None
    assert run.code == "cancelled" and isinstance(run.error, backends.Cancelled)
    assert run.text == " tok" * 5
    # cancelled before it starts: the delay loop notices at once
    slow = ModelConfig("slow", "benchmark", options={"delay_ms": 60_000})
    run = run_backend(BenchmarkBackend, completion(), config=slow, cancel_after=0)
    assert run.code == "cancelled" and run.chunks == []


# -- the harness on the example plugin ----------------------------------------------------------------------


def test_echo_stop_strings():
    run = run_backend(EchoBackend, completion("one two three four", stop=["two", "zzz"]))
    assert run.ok and run.text == run.result.text == "four three "
    assert (run.result.stop_type, run.result.stopping_word) == ("word", "two")
    run = run_backend(EchoBackend, {"op": "chat", "params": {"messages": [{"role": "user", "content": "a b"}],
                                                             "stop": ["b"]}})
    assert run.text == "" and run.result.stopping_word == "b"


def test_echo_resume_text():
    backend, meta = load_backend(EchoBackend)
    assert meta["n_ctx"] == 4096 and backend.config.name == "echo-1"
    first = run_backend(backend, completion("a b c d", max_tokens=2))
    assert first.text == "d c"
    rest = run_backend(backend, completion("a b c d", max_tokens=4 - len(first.tokens), resume_text=first.text))
    assert first.text + rest.text == run_backend(backend, completion("a b c d")).text == "d c b a"
    assert rest.result.text == " b a" and rest.result.finish_reason == "stop"


def test_echo_cancel_keep_partial_is_up_to_the_backend():
    run = run_backend(EchoBackend, completion("a b c"), cancel_after=1)
    assert run.code == "cancelled" and run.text == "c"


# -- errors as the router receives them --------------------------------------------------------------------


def test_unknown_error_code_is_reported_as_internal_error(caplog):
    with caplog.at_level(logging.WARNING, logger="velesio.testing"):
        run = run_backend(Failing, completion("odd"))
    assert run.code == "internal_error" and isinstance(run.error, OddCode)
    assert run.message == "the quota of this account is spent"
    assert run.text == "so far" and run.tokens == [7]
    assert "failing" in caplog.text and "'quota_exceeded'" in caplog.text


def test_other_failures_and_the_wire():
    Failing.loads = 0
    backend, _ = load_backend(Failing)
    run = run_backend(backend, completion("bug"))
    assert run.code == "internal_error" and run.message == "the backend failed: KeyError: 'oops'"
    run = run_backend(backend, completion("unsendable"))
    assert run.code == "internal_error" and "unsendable" in (run.message or "")
    run = run_backend(backend, completion("dict"))
    assert run.code == "internal_error" and run.result is None
    assert run.message == "the backend of model failing-test returned a dict, not a TextResult"
    run = run_backend(backend, completion())
    assert run.ok and run.result == TextResult(text="so far", completion_tokens=1)
    run = run_backend(backend, {"op": "tokenize", "params": {"content": "x"}})
    assert run.ok and run.result == TokenizeResult(tokens=[1, 2])  # as msgpack delivers it
    assert Failing.loads == 1  # an instance is not loaded again
    run_backend(Failing, completion())
    assert Failing.loads == 2  # a class is loaded once per run


def test_backend_process_maps_an_unknown_code_to_internal_error(caplog):
    """worker/runner.py, the backend process: the same mapping, logged with the backend's name."""
    from velesio.worker.runner import Runner

    class Pipe:
        def __init__(self) -> None:
            self.sent: list[list[Any]] = []

        def send(self, message: list[Any]) -> None:
            self.sent.append(message)

    class Partials:
        def flush(self) -> None:
            pass

    pipe = Pipe()
    runner = Runner(pipe, "acct-model")  # type: ignore[arg-type]
    runner.backend, _ = load_backend(Failing)
    for prompt, code in (("odd", "internal_error"), ("bug", "internal_error"), ("dict", "internal_error"),
                         ("x", None)):
        job = Job(op="completion", model="acct-model", params=TextParams(prompt=prompt))
        with caplog.at_level(logging.WARNING, logger="velesio.worker"):
            runner.run_job(1, job, JobContext(job, lambda chunk: None), Partials())  # type: ignore[arg-type]
        kind, _key, frame, outcome = pipe.sent.pop()
        command, body = codec.decode(frame)
        if code is None:
            assert command == Command.FINAL and outcome == "ok"
            assert body["result"] == to_wire(TextResult(text="so far", completion_tokens=1))  # the result's fields
        else:
            assert command == Command.ERROR and body["code"] == outcome == code
    assert "backend failing (model acct-model)" in caplog.text and "'quota_exceeded'" in caplog.text
    # a result that is not the op's type (a backend written for API 1 returns a dict): named in the log
    assert "backend failing (model acct-model) returned dict for completion, not a TextResult" in caplog.text
    runner.close()


def test_unknown_operation_ends_with_invalid_request():
    """A REQUEST for an operation this version does not know (a newer router's): the worker answers ERROR
    invalid_request at once, and so would the backend process, were it to receive one; nothing crashes."""
    import asyncio

    from velesio.worker import ipc
    from velesio.worker.runner import Runner
    from velesio.worker.runtime import Worker

    body = {"id": "j1", "attempt": 2, "op": "transcribe", "model": "m", "stream": False, "params": {"audio": b"x"}}
    with pytest.raises(ValueError, match="unknown operation 'transcribe'"):
        Job.from_wire(body)

    class Link:
        address = "tcp://router"
        seen_seq = 0

        def __init__(self) -> None:
            self.sent: list[tuple[Command, dict[str, Any]]] = []

        def send(self, command: Command, body: dict[str, Any]) -> None:
            self.sent.append((command, body))

    worker = Worker(name="w1")
    try:
        link = Link()
        worker.start_job(link, body)  # type: ignore[arg-type]
        [(command, error)] = link.sent
        assert command == Command.ERROR
        assert (error["job"], error["attempt"], error["code"]) == ("j1", 2, "invalid_request")
        assert "unknown operation 'transcribe'" in error["message"] and not worker.running
    finally:
        worker.ctx.term()

    class Pipe:
        def __init__(self) -> None:
            self.sent: list[list[Any]] = []

        def send(self, message: list[Any]) -> None:
            self.sent.append(message)

    pipe = Pipe()
    runner = Runner(pipe, "m")  # type: ignore[arg-type]
    runner.loop = asyncio.new_event_loop()
    try:
        runner.process([ipc.RUN, 5, body, 0.05])
        [(kind, key, frame, outcome)] = pipe.sent
        command, error = codec.decode(frame)
        assert (kind, key, outcome, command) == (ipc.END, 5, "invalid_request", Command.ERROR)
        assert (error["job"], error["attempt"], error["code"]) == ("j1", 2, "invalid_request") and not runner.jobs
    finally:
        runner.loop.close()
        runner.close()


def test_the_snippet_of_docs_plugins_runs():
    """docs/plugins.md, "Testing a backend without a mesh": its example runs as written."""
    import re

    doc = (Path(__file__).resolve().parent.parent / "docs" / "plugins.md").read_text()
    section = doc[doc.index("## Testing a backend without a mesh"):]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None
    exec(compile(match.group(1), "docs/plugins.md", "exec"), {})
