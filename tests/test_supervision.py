"""A worker survives its backends: each model runs in a backend process the worker supervises. Real router,
worker and backend processes; the benchmark backend's SIMULATED FAULTS (options.faults, backends/benchmark.py)
stand in for a native backend that aborts, segfaults, allocates without end or hangs."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from typing import Any

import msgpack
import pytest
import requests

from conftest import SMOLLM2, FakeRouter
from velesio.mesh.params import TextResult, to_wire
from velesio.mesh.protocol import VERSION

FAULTY = {"name": "faulty", "backend": "benchmark", "slots": 1, "options": {"faults": True, "reply": "fine"}}


def backend_of(router, worker: str, model: str) -> dict[str, Any]:
    for w in router.health()["workers"]:
        if w["id"] == worker:
            for m in w["models"]:
                if m["name"] == model:
                    return m.get("backend_process") or {}
    return {}


def wait_backend(router, worker: str, model: str, predicate, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        state = backend_of(router, worker, model)
        if state and predicate(state):
            return state
        time.sleep(0.1)
    raise AssertionError(f"backend of {model} on {worker} never reached the expected state: {state}")


def crashes(router, workers: list[str], model: str) -> int:
    return sum(backend_of(router, w, model).get("crashes", 0) for w in workers)


def complete(router, prompt: str, model: str = "faulty", **extra: Any):
    return router.post("/completion", {"prompt": prompt, "max_tokens": 4, "model": model, **extra}, timeout=120)


@pytest.mark.parametrize("limit", [1, 2])
def test_a_poison_job_crashes_at_most_the_configured_number_of_backends(start_router, start_worker, limit):
    router = start_router({"job_crash_limit": limit})
    names = [f"poison{limit}-{i}" for i in range(3)]
    procs = [start_worker(router, name, [FAULTY]) for name in names]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        poison = pool.submit(complete, router, "[[abort]] take them all down")
        fine = [pool.submit(complete, router, f"hello {i}") for i in range(12)]
        r = poison.result()
        answers = [f.result() for f in fine]
    assert r.status_code == 500, r.text
    error = r.json()["error"]
    assert error["code"] == "job_crashed_backend"
    assert "crashed the backend" in error["message"] and "not retried" in error["message"]
    # Unmarked jobs kept flowing, around and after the crash.
    assert [a.status_code for a in answers] == [200] * 12, [a.text for a in answers if a.status_code != 200]
    assert all(a.json()["choices"][0]["text"] == "fine" for a in answers), answers[0].text
    # Exactly `limit` backend processes died, every worker process lived on and is registered.
    wait_backend(router, names[0], "faulty", lambda b: True)
    deadline = time.monotonic() + 30
    while crashes(router, names, "faulty") < limit and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # a crash beyond the limit would show by now: the job was already answered
    assert crashes(router, names, "faulty") == limit
    assert all(p.alive() for p in procs)
    router.wait_workers(set(names))
    for name in names:
        wait_backend(router, name, "faulty", lambda b: b["state"] == "ready")
    assert complete(router, "after").status_code == 200
    # The crash is logged with the request id and a digest of the parameters, never the prompt.
    job_id = r.headers["X-Request-Id"]
    log = router.proc.wait_for_log("crashed the backend")
    lines = [line for line in log.splitlines() if job_id in line and "crashed the backend" in line]
    assert lines and "sha256:" in lines[0] and "take them all down" not in log


def test_a_backend_killed_mid_job_is_restarted_and_the_worker_stays(start_router, start_worker):
    router = start_router()
    slow = {**FAULTY, "name": "slow", "options": {"delay_ms": 4000}}
    proc = start_worker(router, "victim", [slow])
    before = wait_backend(router, "victim", "slow", lambda b: b["state"] == "ready")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        running = pool.submit(complete, router, "hello", model="slow")
        deadline = time.monotonic() + 30
        while not router.get("/queue/status").json()["running_jobs"] and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(before["pid"], signal.SIGKILL)
        r = running.result()
    # Killed alone in its backend: the job ends with one clear error (not a hang, not a lost worker).
    assert r.status_code == 500 and r.json()["error"]["code"] == "job_crashed_backend", r.text
    assert "SIGKILL" in r.json()["error"]["message"]
    after = wait_backend(router, "victim", "slow", lambda b: b["state"] == "ready" and b["restarts"] == 1,
                         timeout=30)
    assert after["pid"] != before["pid"] and after["crashes"] == 1 and "SIGKILL" in after["last_crash"]
    assert proc.alive()
    assert complete(router, "again", model="slow").status_code == 200
    metrics = router.get("/metrics").text
    assert 'velesio_backend_restarts{model="slow",worker="victim"} 1.0' in metrics
    assert 'velesio_backend_crashes_total{model="slow",worker="victim"} 1.0' in metrics


def test_a_runaway_allocation_ends_its_own_backend_process(start_router, start_worker):
    router = start_router()
    proc = start_worker(router, "hoarder", [{**FAULTY, "max_memory_mb": 400}])
    r = complete(router, "[[allocate]]")
    assert r.status_code == 500 and r.json()["error"]["code"] == "job_crashed_backend", r.text
    assert "memory ceiling" in r.json()["error"]["message"]
    assert proc.alive()
    wait_backend(router, "hoarder", "faulty", lambda b: b["state"] == "ready" and b["restarts"] == 1)
    assert complete(router, "small").status_code == 200


def test_a_job_stuck_in_native_code_ends_at_max_job_s(start_router, start_worker):
    router = start_router()
    proc = start_worker(router, "stuck", [{**FAULTY, "max_job_s": 1.5}],
                        worker_cfg={"cancel_grace_s": 1.0})
    started = time.monotonic()
    r = complete(router, "[[hang]]")
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    assert "max_job_s" in r.json()["error"]["message"]
    assert time.monotonic() - started < 30
    assert proc.alive()
    wait_backend(router, "stuck", "faulty", lambda b: b["state"] == "ready" and b["restarts"] == 1)
    assert complete(router, "next").status_code == 200


def test_a_worker_survives_a_text_backend_abort(start_router, start_worker):
    """The real llama.cpp backend, killed with SIGABRT as an uncaught C++ exception would: the worker stays
    registered and serves again once the backend process is back."""
    router = start_router()
    proc = start_worker(router, "llm", [SMOLLM2])
    before = wait_backend(router, "llm", SMOLLM2["name"], lambda b: b["state"] == "ready")
    os.kill(before["pid"], signal.SIGABRT)
    wait_backend(router, "llm", SMOLLM2["name"], lambda b: b["restarts"] == 1 and b["state"] == "ready")
    r = router.post("/completion", {"prompt": "Hello", "n_predict": 4})
    assert r.status_code == 200 and r.json()["tokens_predicted"] >= 1, r.text
    assert proc.alive()


def test_a_large_result_crosses_the_pipe_whole(start_router, start_worker):
    """A result far larger than the socket buffer between worker and backend process (images are) arrives
    whole, while the backend process's event loop watches the same socket."""
    router = start_router()
    big = "x" * (8 << 20)
    start_worker(router, "big", [{**FAULTY, "name": "big", "options": {"reply": big}}])
    r = router.post("/completion", {"prompt": "hi", "max_tokens": 1, "model": "big"})
    assert r.status_code == 200, r.text[:300]
    assert r.json()["choices"][0]["text"] == big


def test_a_client_leaving_a_job_stuck_in_native_code_frees_its_slot(start_router, start_worker):
    """The client goes away; the job ignores the cancel (stuck in native code): after cancel_grace_s the
    worker restarts the backend process, and the model serves again."""
    router = start_router()
    proc = start_worker(router, "leaver", [FAULTY], worker_cfg={"cancel_grace_s": 1.0})
    with pytest.raises(requests.exceptions.Timeout):
        router.post("/completion", {"prompt": "[[hang]]", "max_tokens": 4, "model": "faulty"}, timeout=2)
    state = wait_backend(router, "leaver", "faulty", lambda b: b["restarts"] == 1 and b["state"] == "ready")
    assert state["crashes"] == 0  # a restart for the stuck job's sake, not a crash
    assert complete(router, "next").status_code == 200
    assert proc.alive()


def test_a_cancel_for_a_job_the_worker_does_not_run_is_answered(start_worker):
    """A router that cancels a job whose REQUEST never reached the worker hears that it is over, so the
    slot it counts as taken is freed (a real worker under a bare ROUTER socket)."""
    router = FakeRouter(timeout_ms=30000)
    fake = router.sock
    proc = start_worker(router, "canceller", [FAULTY], wait=False)
    try:
        identity, frame = fake.recv_multipart()
        assert msgpack.unpackb(frame)[0] == 1  # READY
        fake.send_multipart([identity, msgpack.packb([2, {"version": VERSION, "router": "fake",
                                                          "heartbeat_ms": 750, "liveness": 3}])])
        fake.send_multipart([identity, msgpack.packb([8, {"job": "j-lost", "attempt": 3, "keep": False}])])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            fake.send_multipart([identity, msgpack.packb([3, {}])])
            if not fake.poll(250):
                continue
            command, body = msgpack.unpackb(fake.recv_multipart()[1])
            if command == 7:
                assert body["job"] == "j-lost" and body["attempt"] == 3 and body["code"] == "cancelled"
                return
        raise AssertionError("no answer to the CANCEL")
    finally:
        fake.close()
        proc.stop()


def test_typed_results_and_an_unknown_operation_through_a_real_worker(start_worker):
    """A real worker and backend process under a bare ROUTER: a job's FINAL carries the typed result's fields
    (mesh/params.py), and a REQUEST for an operation this version does not know (a newer router's) ends with
    ERROR invalid_request, the worker serving on."""
    router = FakeRouter(timeout_ms=30000)
    fake = router.sock
    proc = start_worker(router, "typed", [FAULTY], wait=False)
    try:
        identity, frame = fake.recv_multipart()
        assert msgpack.unpackb(frame)[0] == 1  # READY
        fake.send_multipart([identity, msgpack.packb([2, {"version": VERSION, "router": "fake",
                                                          "heartbeat_ms": 750, "liveness": 3}])])
        for job, op, params in (("j-new", "transcribe", {"audio": b"x"}), ("j-ok", "completion", {"prompt": "hi"})):
            fake.send_multipart([identity, msgpack.packb([4, {"id": job, "attempt": 1, "op": op, "model": "faulty",
                                                              "stream": False, "params": params}])])
        ended: dict[str, tuple[int, dict[str, Any]]] = {}
        deadline = time.monotonic() + 30
        while len(ended) < 2 and time.monotonic() < deadline:
            fake.send_multipart([identity, msgpack.packb([3, {}])])
            if not fake.poll(250):
                continue
            command, body = msgpack.unpackb(fake.recv_multipart()[1])
            if command in (6, 7):
                ended[body["job"]] = (command, body)
        command, body = ended["j-new"]
        assert command == 7 and body["code"] == "invalid_request"
        assert "unknown operation 'transcribe'" in body["message"]
        command, body = ended["j-ok"]
        assert command == 6, body
        assert body["result"] == to_wire(TextResult(text="fine", finish_reason="length", stop_type="limit",
                                                    prompt_tokens=1, completion_tokens=1))
        assert proc.alive()
    finally:
        fake.close()
        proc.stop()
