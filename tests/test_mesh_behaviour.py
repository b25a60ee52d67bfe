"""The mesh with real processes: spreading load, dead workers, router restarts, cancellation, versions."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import threading
import time

import msgpack
import requests
import zmq

from conftest import SMOLLM2, FakeRouter, free_port
from velesio.mesh.protocol import VERSION

LONG = {"prompt": "Write a very long story about a dragon:", "max_tokens": 1500, "temperature": 0.8,
        "ignore_eos": True}


def worker_field(router, name, field):
    for w in router.health()["workers"]:
        if w["id"] == name:
            return w[field]
    return None


def test_two_workers_share_load_and_dead_one_disappears(start_router, start_worker):
    router = start_router()
    w1 = start_worker(router, "share-a", [SMOLLM2])
    start_worker(router, "share-b", [SMOLLM2])
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: router.post("/completion", {"prompt": f"Number {i}:", "max_tokens": 24}),
                                range(8)))
    assert all(r.status_code == 200 for r in replies)
    done = {w["id"]: w["jobs_done"] for w in router.health()["workers"]}
    assert done["share-a"] >= 2 and done["share-b"] >= 2, done

    w1.signal(signal.SIGKILL)
    killed = time.monotonic()
    router.wait_for(lambda h: {w["id"] for w in h["workers"]} == {"share-b"}, timeout=10)
    assert time.monotonic() - killed <= 3.0
    q = router.get("/queue/status").json()
    assert [w["id"] for w in q["workers"]] == ["share-b"]
    assert router.post("/completion", {"prompt": "Still there?", "max_tokens": 4}).status_code == 200


def test_router_restart_workers_come_back(start_router, start_worker):
    port, mesh_port = free_port(), free_port()
    router = start_router(port=port, mesh_port=mesh_port)
    start_worker(router, "survivor", [SMOLLM2])
    router.proc.signal(signal.SIGKILL)
    router.proc.popen.wait(5)
    router2 = start_router(port=port, mesh_port=mesh_port)
    back = time.monotonic()
    router2.wait_workers({"survivor"}, timeout=10)
    assert time.monotonic() - back <= 2.0
    r = router2.post("/completion", {"prompt": "Hello", "max_tokens": 4})
    assert r.status_code == 200, r.text


def test_client_disconnect_cancels_generation(start_router, start_worker):
    router = start_router()
    start_worker(router, "cancel-me", [SMOLLM2])
    with requests.post(router.url + "/completion", json={**LONG, "stream": True}, headers=router.headers,
                       stream=True, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert any(line.startswith(b"data: ") for line in got)
        assert worker_field(router, "cancel-me", "jobs_in_flight") == 1
    stopped = time.monotonic()
    router.wait_for(lambda h: h["workers"][0]["jobs_in_flight"] == 0, timeout=5)
    # 1500 tokens take ~10 s here; the job ended within a second of the disconnect.
    assert time.monotonic() - stopped < 2.0
    assert worker_field(router, "cancel-me", "jobs_done") == 1
    assert router.post("/completion", {"prompt": "Next", "max_tokens": 2}).status_code == 200


def test_heartbeats_flow_while_generating(start_router, start_worker):
    router = start_router()
    start_worker(router, "busy", [SMOLLM2])
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", router.post("/completion", {**LONG, "max_tokens": 600})))
    t.start()
    ages = []
    time.sleep(0.3)
    while t.is_alive():
        health = router.health()
        if health["workers"] and health["workers"][0]["jobs_in_flight"]:
            ages.append(health["workers"][0]["heartbeat_age_s"])
        time.sleep(0.2)
    t.join()
    assert result["r"].status_code == 200
    assert len(ages) >= 5
    assert max(ages) < 2.25, ages  # heartbeat_ms × liveness: never close to being declared dead


def test_stream_fails_over_to_another_worker(start_router, start_worker):
    """kill -9 the worker of a stream that already sent text: the stream goes on from another worker."""
    router = start_router()
    procs = {name: start_worker(router, name, [SMOLLM2]) for name in ("fo-a", "fo-b")}
    # The llama.cpp dialect (n_predict, ignore_eos) keeps the model talking for all 300 tokens.
    body = {"prompt": "Tell me about the sea:", "n_predict": 300, "ignore_eos": True, "stream": True}
    text, victim, events = "", None, []
    with requests.post(router.url + "/completion", json=body, headers=router.headers, stream=True,
                       timeout=120) as r:
        for line in r.iter_lines():
            if not line:
                continue
            event = json.loads(line[len(b"data: "):])
            assert "error" not in event, event
            events.append(event)
            text += event["content"]
            if victim is None and len(text) > 40:
                running = [w["id"] for w in router.health()["workers"] if w["jobs_in_flight"]]
                assert len(running) == 1
                victim = running[0]
                procs[victim].signal(signal.SIGKILL)
    assert victim is not None
    assert events[-1]["stop"] is True and events[-1]["stop_type"] == "limit"
    assert len(text) > 200
    survivor = ({"fo-a", "fo-b"} - {victim}).pop()
    assert worker_field(router, survivor, "jobs_done") == 1
    assert "re-dispatching as attempt 2" in router.proc.log


def test_router_refuses_other_major_version(start_router):
    router = start_router()
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    sock.connect(router.mesh)
    sock.send(msgpack.packb([1, {"version": "3.0", "worker": "from-the-future", "capabilities": {}}]))
    command, body = msgpack.unpackb(sock.recv())
    sock.close()
    assert command == 9 and body["reason"] == "version"
    assert "refusing worker 'from-the-future'" in router.proc.log
    assert router.health()["workers"] == []


def test_worker_logs_refusal(start_worker, spawn, tmp_path):
    """A real worker against a router speaking another version logs the refusal and keeps trying."""
    router = FakeRouter()
    fake = router.sock
    proc = start_worker(router, "old-worker", [SMOLLM2], wait=False)
    identity, frame = fake.recv_multipart()
    assert msgpack.unpackb(frame)[0] == 1  # READY
    fake.send_multipart([identity, msgpack.packb([9, {"reason": "version", "version": "3.0",
                                                      "message": "router speaks mesh protocol 3.0"}])])
    deadline = time.monotonic() + 10
    while "refused this worker" not in proc.log and time.monotonic() < deadline:
        time.sleep(0.1)
    fake.close()
    assert "refused this worker" in proc.log
    assert proc.alive()


def test_job_a_worker_does_not_know_moves_elsewhere(start_router, start_worker):
    """A peer that takes a REQUEST but never lists the job in its heartbeats (a lost message) loses it."""
    router = start_router()
    ctx = zmq.Context.instance()
    fake = ctx.socket(zmq.DEALER)
    fake.setsockopt(zmq.LINGER, 0)
    fake.setsockopt(zmq.RCVTIMEO, 10000)
    fake.connect(router.mesh)
    model = {"name": "smollm2-135m-instruct", "backend": "llama-cpp", "kind": "text",
             "operations": ["completion"], "slots": 1, "meta": {"n_ctx": 2048}}
    fake.send(msgpack.packb([1, {"version": VERSION, "worker": "forgetful", "capabilities": {"models": [model]}}]))
    assert msgpack.unpackb(fake.recv())[0] == 2  # WELCOME
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("r", router.post("/completion",
                                                                           {"prompt": "Hi", "max_tokens": 3})))
    t.start()
    command, body = msgpack.unpackb(fake.recv())
    assert command == 4 and body["op"] == "completion"  # REQUEST, which the fake will never run
    start_worker(router, "reliable", [SMOLLM2])
    while t.is_alive():  # heartbeats that saw the REQUEST but do not list its job
        fake.send(msgpack.packb([3, {"load": {}, "jobs": [], "seen": body["seq"]}]))
        time.sleep(0.25)
    fake.close()
    assert result["r"].status_code == 200, result["r"].text
    assert "forgetful does not know the job" in router.proc.log
    assert worker_field(router, "reliable", "jobs_done") == 1
