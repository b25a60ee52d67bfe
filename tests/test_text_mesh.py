"""The seed's text API end to end: router process → ZeroMQ → worker process → llama.cpp (SmolLM2)."""

from __future__ import annotations

import json
import time

import pytest
import requests

from conftest import TOKEN, sse_events

CHAT = {"messages": [{"role": "system", "content": "You are a helpful assistant."},
                     {"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        "max_tokens": 24, "temperature": 0}



def test_seed_completion_shape(mesh):
    r = mesh.post("/completion", {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert isinstance(body["created"], int)
    assert body["model"] == "smollm2-135m-instruct"
    choice = body["choices"][0]
    assert "Paris" in choice["text"]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_seed_completion_defaults_and_limit(mesh):
    r = mesh.post("/completion", {"prompt": "Count: one, two, three,", "max_tokens": 5})
    body = r.json()
    assert body["usage"]["completion_tokens"] <= 5
    assert body["choices"][0]["finish_reason"] == "length"


def test_seed_chat_answers(mesh):
    r = mesh.post("/chat/completions", CHAT)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert "Paris" in message["content"]


def test_seed_stream_completion(mesh):
    r = mesh.post("/completion", {"prompt": "Write a story:", "max_tokens": 12, "stream": True, "seed": 7},
                  stream=True)
    assert r.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert len([c for c in chunks if c["choices"][0]["text"]]) >= 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # The same request without streaming gives the same text (same seed).
    whole = mesh.post("/completion", {"prompt": "Write a story:", "max_tokens": 12, "seed": 7}).json()
    assert whole["choices"][0]["text"] == text


def test_seed_stream_chat(mesh):
    r = mesh.post("/chat/completions", {**CHAT, "stream": True}, stream=True)
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert "Paris" in text
    assert len({c["id"] for c in chunks}) == 1


def test_stop_sequence(mesh):
    r = mesh.post("/completion", {"prompt": "1, 2, 3, 4,", "max_tokens": 30, "temperature": 0, "stop": ["7"]})
    text = r.json()["choices"][0]["text"]
    assert "7" not in text and "6" in text
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_health_models_queue(mesh):
    h = mesh.health()
    assert h["status"] == "healthy"
    assert h["services"]["llm_worker"] == "ready"
    assert h["version"] and h["timestamp"].endswith("Z")
    models = mesh.get("/models").json()
    names = [m["name"] for m in models["text_models"]]
    assert "smollm2-135m-instruct" in names
    entry = models["text_models"][names.index("smollm2-135m-instruct")]
    assert entry["loaded"] is True and entry["type"] == "chat"
    q = mesh.get("/queue/status").json()
    for key in ("queue_depth", "active_workers", "pending_jobs", "completed_jobs_24h", "workers"):
        assert key in q
    assert q["active_workers"] >= 1
    worker = q["workers"][0]
    assert {"id", "type", "status", "current_job"} <= set(worker)
    assert worker["type"] == "llm"


def test_completed_jobs_counted(mesh):
    before = mesh.get("/queue/status").json()["completed_jobs_24h"]
    mesh.post("/completion", {"prompt": "Hi", "max_tokens": 2})
    after = mesh.get("/queue/status").json()["completed_jobs_24h"]
    assert after == before + 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic !!"},
                                     {"Authorization": "Token " + TOKEN}])
def test_unauthorized(mesh, headers):
    r = requests.post(mesh.url + "/completion", json={"prompt": "x"}, headers=headers, timeout=10)
    assert r.status_code == 401
    err = r.json()["error"]
    assert err["code"] == "unauthorized" and err["message"]


BAD_REQUESTS = [
    ({"max_tokens": 5}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "10"}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "frequency_penalty": 3}, "frequency_penalty"),
    ({"prompt": "x", "presence_penalty": -2.5}, "presence_penalty"),
    ({"prompt": "x", "stop": [1, 2]}, "stop"),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "model": 3}, "model"),
]


@pytest.mark.parametrize("body,field", BAD_REQUESTS)
def test_invalid_completion(mesh, body, field):
    r = mesh.post("/completion", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "invalid_request"
    assert field in err["message"]


@pytest.mark.parametrize("body,field", [
    ({}, "messages"), ({"messages": []}, "messages"), ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, "content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, "max_tokens"),
])
def test_invalid_chat(mesh, body, field):
    r = mesh.post("/chat/completions", body)
    assert r.status_code == 400
    assert field in r.json()["error"]["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_malformed_body(mesh, raw):
    r = requests.post(mesh.url + "/completion", data=raw, timeout=10,
                      headers={**mesh.headers, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_request"


def test_unknown_model(mesh):
    r = mesh.post("/completion", {"prompt": "x", "model": "no-such-model"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "model_not_found"
    assert "smollm2-135m-instruct" in r.json()["error"]["details"]["available"]


def test_unknown_route_and_method(mesh):
    assert mesh.get("/nope").status_code == 404
    r = mesh.get("/completion")
    assert r.status_code == 405
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_oversized_body(start_router):
    router = start_router({"max_body_mb": 0.01})
    r = router.post("/completion", {"prompt": "x" * 20000})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"


def test_rate_limit_headers(mesh):
    r = mesh.post("/completion", {"prompt": "Hi", "max_tokens": 1})
    assert int(r.headers["X-RateLimit-Limit"]) > 0
    assert int(r.headers["X-RateLimit-Remaining"]) >= 0
    assert int(r.headers["X-RateLimit-Reset"]) > 1_600_000_000


def test_prompt_longer_than_the_context_is_refused(mesh):
    r = mesh.post("/completion", {"prompt": "word " * 100_000, "max_tokens": 4})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_exceeded" and "context" in err["message"]
    # Over the context but under the router's character bound: the worker counts tokens and says so.
    r = mesh.post("/chat/completions", {"messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 4})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_exceeded"
    assert "tokens" in r.json()["error"]["message"]


def test_request_id_follows_the_job_into_both_logs(mesh, start_worker):
    r = mesh.post("/completion", {"prompt": "Hi", "max_tokens": 2})
    job_id = r.headers["X-Request-Id"]
    assert job_id.startswith("j-")
    assert job_id in mesh.proc.wait_for_log(job_id)
    worker_logs = [p for p in mesh.proc.log_path.parent.glob("worker-text-1-*.log")]
    deadline = time.monotonic() + 5
    while not any(job_id in p.read_text() for p in worker_logs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert any(job_id in p.read_text() for p in worker_logs)


def test_json_lines_logs(start_router, start_worker):
    router = start_router(extra_args=["--log-json"])
    start_worker(router, "json-logs", [{"name": "smollm2-135m-instruct", "backend": "llama-cpp",
                                        "options": {"n_threads": 1}}])
    job_id = router.post("/completion", {"prompt": "Hi", "max_tokens": 2}).headers["X-Request-Id"]
    entries = [json.loads(line) for line in router.proc.wait_for_log(job_id).splitlines() if line.startswith("{")]
    assert entries and all({"ts", "level", "logger", "msg"} <= set(e) for e in entries)
    assert any(e.get("job") == job_id and e.get("worker") == "json-logs" for e in entries)
