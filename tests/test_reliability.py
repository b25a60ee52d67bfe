"""Admission, drains and faults with real processes: every request ends with one result or one clear error."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import threading
import time

import pytest
import requests

from conftest import SMOLLM2

LONG = {"prompt": "Write a very long story about a dragon:", "n_predict": 1500, "ignore_eos": True}


def test_requests_per_minute_limit(start_router, start_worker):
    router = start_router({"rate_limit": {"requests_per_minute": 3, "concurrent": 10}})
    start_worker(router, "rl", [SMOLLM2])
    codes = [router.post("/completion", {"prompt": "Hi", "max_tokens": 1}) for _ in range(4)]
    assert [r.status_code for r in codes] == [200, 200, 200, 429]
    assert [r.headers["X-RateLimit-Remaining"] for r in codes] == ["2", "1", "0", "0"]
    limited = codes[-1]
    assert limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert limited.headers["X-RateLimit-Limit"] == "3"


def test_per_token_limits(start_router):
    router = start_router({"tokens": [{"token": "tok-alice", "name": "alice"}, {"token": "tok-bob", "name": "bob"}],
                           "token_limits": {"bob": {"requests_per_minute": 1, "concurrent": 1}}}, token=None)
    bob = {"Authorization": "Bearer tok-bob"}
    alice = {"Authorization": "Bearer tok-alice"}
    assert requests.get(router.url + "/models", headers=bob, timeout=10).status_code == 200
    assert requests.get(router.url + "/models", headers=bob, timeout=10).status_code == 429
    for _ in range(3):
        r = requests.get(router.url + "/models", headers=alice, timeout=10)
        assert r.status_code == 200 and r.headers["X-RateLimit-Limit"] == "100000"


def test_concurrency_limit(start_router, start_worker):
    router = start_router({"rate_limit": {"requests_per_minute": 1000, "concurrent": 1}})
    start_worker(router, "burst", [SMOLLM2])
    with requests.post(router.url + "/completion", json={**LONG, "stream": True}, headers=router.headers,
                       stream=True, timeout=60) as r:
        lines = r.iter_lines()  # held: dropping the generator closes the connection
        first = next(lines)
        assert b'"stop":false' in first, first
        second = router.post("/completion", {"prompt": "Hi", "max_tokens": 1})
        assert second.status_code == 429
        assert "concurrent" in second.json()["error"]["message"]
    time.sleep(0.3)
    assert router.post("/completion", {"prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_queue_full_and_queued_cancel(start_router, start_worker):
    router = start_router({"queue_max": 1})
    start_worker(router, "q", [SMOLLM2])
    with requests.post(router.url + "/completion", json={**LONG, "stream": True}, headers=router.headers,
                       stream=True, timeout=60) as running:
        running_lines = running.iter_lines()
        next(running_lines)
        # A queued stream has no status line yet (it is sent with the job's first piece): a raw client.
        body = json.dumps({**LONG, "stream": True}).encode()
        with socket.create_connection(("127.0.0.1", router.port), timeout=60) as queued:
            queued.sendall(f"POST /completion HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {router.token}\r\n"
                           f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 5
            while router.get("/queue/status").json()["queue_depth"] != 1 and time.monotonic() < deadline:
                time.sleep(0.05)
            full = router.post("/completion", {"prompt": "Hi", "max_tokens": 1})
            assert full.status_code == 503
            assert full.json()["error"]["code"] == "queue_full"
            assert int(full.headers["Retry-After"]) >= 1
        # The queued client went away: its job leaves the queue without ever running.
        deadline = time.monotonic() + 5
        while router.get("/queue/status").json()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert router.get("/queue/status").json()["queue_depth"] == 0
    time.sleep(0.5)
    assert router.health()["workers"][0]["jobs_done"] == 1


def test_no_worker_answers_503_quickly(start_router):
    router = start_router({"worker_wait_s": 1.0})
    started = time.monotonic()
    r = router.post("/completion", {"prompt": "Hi"})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "no_worker"
    assert "Retry-After" in r.headers
    assert time.monotonic() - started < 3


def test_request_waits_for_a_worker_that_is_starting(start_router, start_worker):
    router = start_router({"worker_wait_s": 30})
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", router.post("/completion",
                                                                           {"prompt": "Hi", "max_tokens": 2})))
    t.start()
    start_worker(router, "late", [SMOLLM2])
    t.join(30)
    assert result["r"].status_code == 200


def test_worker_sigterm_drains(start_router, start_worker):
    router = start_router()
    worker = start_worker(router, "drainer", [SMOLLM2])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(router.post, "/completion", {"prompt": "Tell me a story:", "n_predict": 200,
                                                          "ignore_eos": True})
        router.wait_for(lambda h: h["workers"] and h["workers"][0]["jobs_in_flight"] == 1, timeout=10)
        worker.signal(signal.SIGTERM)
        r = future.result(60)
    assert r.status_code == 200
    assert r.json()["tokens_predicted"] == 200
    assert worker.popen.wait(30) == 0
    router.wait_for(lambda h: h["workers"] == [], timeout=5)


def test_router_sigterm_ends_streams_with_a_final_event(start_router, start_worker):
    """A stream still open when the drain ends gets a final error event. The stream cannot end first: it
    asks for 1500 tokens with ignore_eos (seconds of generation at the least), the drain lasts 1 s."""
    router = start_router({"drain_s": 1})
    start_worker(router, "stay", [SMOLLM2])
    events = []
    with requests.post(router.url + "/completion", json={**LONG, "stream": True}, headers=router.headers,
                       stream=True, timeout=60) as r:
        lines = r.iter_lines()
        events.append(next(lines))
        router.proc.signal(signal.SIGTERM)
        for line in lines:
            if line:
                events.append(line)
    # llama.cpp's stream shape (n_predict, ignore_eos): the last event is the error, no [DONE] follows
    final = json.loads(events[-1][len(b"data: "):])
    assert final == {"error": {"code": 503, "message": "the router is shutting down; retry shortly",
                               "type": "unavailable_error", "details": None}}, events[-3:]
    assert all(json.loads(e[len(b"data: "):]).get("stop") is False for e in events[:-1])
    assert router.proc.popen.wait(15) == 0


def test_stuck_worker_job_moves(start_router, start_worker):
    """A worker that still beats but makes no progress loses the job to another worker. The stalled GPU is
    simulated with the benchmark backend's fixed delay (it is the only thing it is used for here)."""
    router = start_router({"job_stall_s": 2})
    start_worker(router, "stuck", [{"name": "shared", "backend": "benchmark", "options": {"delay_ms": 60000}}])
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", router.post("/completion", {"prompt": "x",
                                                                                         "model": "shared"})))
    t.start()
    router.wait_for(lambda h: h["workers"][0]["jobs_in_flight"] == 1, timeout=10)
    start_worker(router, "healthy", [{"name": "shared", "backend": "benchmark", "options": {"reply": "fine"}}])
    t.join(20)
    r = result["r"]
    assert r.status_code == 200
    assert r.json()["choices"][0]["text"] == "fine"
    assert "no progress on worker stuck" in router.proc.log


def test_kill_9_under_mixed_load_loses_nothing(start_router, start_worker):
    """Six requests at once, streamed and not, over two workers; one is killed mid-way. Every request ends
    with exactly one complete answer, and the dead worker is gone from /health within 3 s."""
    router = start_router()
    smol2 = {**SMOLLM2, "slots": 2}
    procs = {name: start_worker(router, name, [smol2]) for name in ("mix-a", "mix-b")}
    body = {"prompt": "Tell me about rivers:", "n_predict": 120, "ignore_eos": True}

    def non_stream(_):
        r = router.post("/completion", body)
        return r.status_code, r.json()

    def stream(_):
        pieces, final = [], None
        with requests.post(router.url + "/completion", json={**body, "stream": True}, headers=router.headers,
                           stream=True, timeout=120) as r:
            lines = r.iter_lines()
            for line in lines:
                if line:
                    event = json.loads(line[len(b"data: "):])
                    if event.get("stop") or "error" in event:
                        final = event
                    else:
                        pieces.append(event["content"])
        return r.status_code, {"pieces": pieces, "final": final}

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(non_stream if i % 2 else stream, i) for i in range(6)]
        router.wait_for(lambda h: sum(w["jobs_in_flight"] for w in h["workers"]) >= 4, timeout=20)
        procs["mix-a"].signal(signal.SIGKILL)
        killed = time.monotonic()
        router.wait_for(lambda h: {w["id"] for w in h["workers"]} == {"mix-b"}, timeout=10)
        detection = time.monotonic() - killed
        results = [f.result(180) for f in futures]
    assert detection <= 3.0
    for i, (status, out) in enumerate(results):
        assert status == 200, out
        if i % 2:  # non-stream: one whole answer of exactly the asked length
            assert out["stop"] is True and out["tokens_predicted"] == 120 and out["stop_type"] == "limit"
        else:  # stream: one final event, no error, the text continued to the end
            assert out["final"] is not None and "error" not in out["final"], out["final"]
            assert out["final"]["stop_type"] == "limit"
            assert "".join(out["pieces"]).strip()
    q = router.get("/queue/status").json()
    assert q["pending_jobs"] == 0
    assert q["completed_jobs_24h"] == 6  # one result per request: nothing lost, nothing delivered twice


def test_image_job_restarts_on_another_worker(start_router, start_worker):
    pytest.importorskip("diffusers")
    router = start_router()
    procs = {name: start_worker(router, name, [{"name": "tiny-sd", "backend": "diffusers"}], wait=False)
             for name in ("img-a", "img-b")}
    router.wait_workers({"img-a", "img-b"}, timeout=120)
    body = {"prompt": "a lighthouse", "width": 256, "height": 256, "steps": 40, "seed": 5}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(router.post, "/sdapi/v1/txt2img", body)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            progress = router.get("/sdapi/v1/progress").json()
            if progress["state"]["sampling_step"] >= 2:
                break
            time.sleep(0.05)
        running = [w["id"] for w in router.health()["workers"] if w["jobs_in_flight"]]
        assert len(running) == 1
        procs[running[0]].signal(signal.SIGKILL)
        r = future.result(120)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 1 and info["seed"] == 5 and not info.get("interrupted")
    assert "re-dispatching as attempt 2" in router.proc.log
