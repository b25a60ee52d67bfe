"""Models at run time, with real router and worker processes: the admin API loads a second model onto a
running worker while jobs run on the first, changes its slots, unloads it with a job in flight (drained, or
moved to another worker), refuses a model that does not fit, puts an idle model to sleep (``keep_alive``)
and wakes it for the next job; and only admin tokens open it (docs/deployment.md "Admin API")."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from conftest import SMOLLM2, TOKEN, Proc, Router

ADMIN = "admin-test-token"
TEXT = {**SMOLLM2, "options": {"n_ctx": 512, "n_threads": 1}}
FIRST = TEXT["name"]


def second(name: str, **more: Any) -> dict[str, Any]:
    """Another entry of the embedded SmolLM2 (the same GGUF, served under ``name``)."""
    return {"name": name, "backend": "llama-cpp", "embedded": FIRST, "slots": 1,
            "options": {"n_ctx": 512, "n_threads": 1, "embeddings": False}, **more}


def admin(router: Router, method: str, path: str, token: str | None = ADMIN, **kw: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, router.url + path, headers=headers, timeout=kw.pop("timeout", 180), **kw)


def wait_until(check: Callable[[], Any], what: str, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def model_of(router: Router, worker: str, model: str) -> dict[str, Any] | None:
    view = admin(router, "GET", f"/admin/workers/{worker}").json()
    return next((m for m in view["models"] if m["name"] == model), None)


def served(router: Router) -> dict[str, dict[str, Any]]:
    body = router.get("/models").json()
    return {m["name"]: m for m in body["text_models"]}


def stream(router: Router, model: str, n: int, events: list[dict[str, Any]], first: threading.Event) -> None:
    """A llama.cpp-style streamed completion of ``n`` tokens (EOS ignored), its events kept in ``events``."""
    body = {"model": model, "prompt": "Count slowly:", "n_predict": n, "ignore_eos": True, "stream": True,
            "temperature": 0}
    with router.post("/completion", body, stream=True, timeout=300) as r:
        events.append({"status": r.status_code})
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
                first.set()
    events.append({"ended": time.monotonic()})
    first.set()


def finished_cleanly(events: list[dict[str, Any]]) -> bool:
    data = [e for e in events if "status" not in e and "ended" not in e]
    return events[0]["status"] == 200 and bool(data) and data[-1].get("stop") is True and \
        not any("error" in e for e in data)


WORKERS: dict[str, Proc] = {}


@pytest.fixture(scope="module")
def rt(start_router, start_worker) -> Router:
    """A router with an admin token; worker rt-1 serves SmolLM2 from its start; rt-2 starts with no model and
    a memory budget of 160 MB (one SmolLM2, about 104 MB by its estimate, fits; two do not)."""
    router = start_router({"admin_tokens": [ADMIN]})
    WORKERS["rt-1"] = start_worker(router, "rt-1", [TEXT], wait=False)
    WORKERS["rt-2"] = start_worker(router, "rt-2", [], wait=False, worker_cfg={"memory_budget_mb": 160})
    router.wait_workers({"rt-1", "rt-2"})
    router.wait_for(lambda h: any(m["name"] == FIRST for w in h["workers"] for m in w["models"]))
    return router


def test_admin_routes_take_admin_tokens_and_nothing_else(rt, start_router):
    listed = admin(rt, "GET", "/admin/workers")
    assert listed.status_code == 200, listed.text
    workers = {w["id"]: w for w in listed.json()["workers"]}
    assert workers["rt-1"]["version"] == "2.1" and workers["rt-1"]["models_at_run_time"] is True
    [model] = workers["rt-1"]["models"]
    assert model["name"] == FIRST and model["state"] == "ready" and isinstance(model["pid"], int)
    assert 90 < model["size_mb"] < 130  # the GGUF's 94 MB and a tenth
    assert workers["rt-2"]["models"] == [] and workers["rt-2"]["memory_budget_mb"] == 160

    user = admin(rt, "GET", "/admin/workers", token=TOKEN)
    assert user.status_code == 403 and user.json()["error"]["code"] == "forbidden", user.text
    assert admin(rt, "POST", "/admin/workers/rt-2/models", token=TOKEN, json=second("x")).status_code == 403
    nobody = admin(rt, "GET", "/admin/workers", token=None)
    assert nobody.status_code == 401 and nobody.json()["error"]["code"] == "unauthorized"
    assert admin(rt, "GET", "/admin/workers", token="wrong").status_code == 401
    # ... and an admin token is no API token.
    assert admin(rt, "GET", "/models").status_code == 401

    off = start_router()  # no admin token configured: the admin API is off, and says how to turn it on
    refused = admin(off, "GET", "/admin/workers")
    assert refused.status_code == 403 and "admin_tokens" in refused.json()["error"]["message"]


def test_a_model_is_loaded_used_resized_and_unloaded_while_jobs_run(rt):
    # Requests keep running on the first model the whole time.
    stop, results = threading.Event(), []

    def keep_busy() -> None:
        while not stop.is_set():
            started = time.monotonic()
            r = rt.post("/completion", {"model": FIRST, "prompt": "Say hi:", "max_tokens": 16})
            results.append((started, time.monotonic(), r.status_code))

    busy = threading.Thread(target=keep_busy)
    busy.start()
    try:
        wait_until(lambda: results, "a first request on the first model")
        began = time.monotonic()
        loaded = admin(rt, "POST", "/admin/workers/rt-1/models", json=second("smollm2-b"))
        done = time.monotonic()
        assert loaded.status_code == 201, loaded.text
        body = loaded.json()
        assert body["worker"] == "rt-1" and body["model"]["name"] == "smollm2-b"
        assert body["model"]["state"] == "ready" and body["model"]["slots"] == 1
        # The router knew of it before it answered: the model is offered and takes jobs at once.
        assert "smollm2-b" in served(rt)
        used = rt.post("/completion", {"model": "smollm2-b", "prompt": "Hello", "max_tokens": 8})
        assert used.status_code == 200 and used.json()["model"] == "smollm2-b", used.text
    finally:
        stop.set()
        busy.join(120)
    assert results and all(status == 200 for _, _, status in results), results
    assert any(start < done and end > began for start, end, _ in results), "no request ran during the load"

    # More slots: a new backend process with two contexts, then two jobs at once.
    wider = admin(rt, "PATCH", "/admin/workers/rt-1/models/smollm2-b", json={"slots": 2})
    assert wider.status_code == 200 and wider.json()["model"]["slots"] == 2, wider.text
    assert served(rt)["smollm2-b"]["slots"] == 2
    events: list[list[dict[str, Any]]] = [[], []]
    firsts = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=stream, args=(rt, "smollm2-b", 48, events[i], firsts[i])) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(finished_cleanly(e) for e in events), events
    fewer = admin(rt, "PATCH", "/admin/workers/rt-1/models/smollm2-b", json={"slots": 1})
    assert fewer.status_code == 200 and fewer.json()["model"]["slots"] == 1
    assert served(rt)["smollm2-b"]["slots"] == 1

    # Unload with a job in flight: the job finishes, then the model is gone.
    events_, first = [], threading.Event()
    job = threading.Thread(target=stream, args=(rt, "smollm2-b", 400, events_, first))
    job.start()
    assert first.wait(120), "the stream never started"
    unloaded = admin(rt, "DELETE", "/admin/workers/rt-1/models/smollm2-b")
    job.join(180)
    assert unloaded.status_code == 200 and unloaded.json() == {"worker": "rt-1", "model": "smollm2-b",
                                                               "unloaded": True, "moved": 0}, unloaded.text
    assert finished_cleanly(events_), events_[-3:]
    # Drained: the worker's own log has the job in flight at the unload, ending before the model went.
    log = WORKERS["rt-1"].wait_for_log("model smollm2-b unloaded")
    waited = log.index("unloading model smollm2-b: waiting for its 1 job(s) to finish")
    ended = log.index(" on smollm2-b: ok", waited)
    assert waited < ended < log.index("model smollm2-b unloaded")
    assert "smollm2-b" not in served(rt) and FIRST in served(rt)
    gone = rt.post("/completion", {"model": "smollm2-b", "prompt": "x", "max_tokens": 2})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    assert model_of(rt, "rt-1", "smollm2-b") is None


def test_unload_with_move_hands_the_job_to_another_worker(rt):
    for worker in ("rt-1", "rt-2"):
        r = admin(rt, "POST", f"/admin/workers/{worker}/models", json=second("smollm2-m"))
        assert r.status_code == 201, r.text
    try:
        events, first = [], threading.Event()
        job = threading.Thread(target=stream, args=(rt, "smollm2-m", 300, events, first))
        job.start()
        assert first.wait(120), "the stream never started"
        running = wait_until(lambda: [w for w in ("rt-1", "rt-2")
                                      if (model_of(rt, w, "smollm2-m") or {}).get("free") == 0], "the job's worker")
        [holder] = running
        other = "rt-2" if holder == "rt-1" else "rt-1"
        moved = admin(rt, "DELETE", f"/admin/workers/{holder}/models/smollm2-m?move=1")
        assert moved.status_code == 200 and moved.json()["moved"] == 1, moved.text
        job.join(180)
        assert finished_cleanly(events), events[-3:]  # one stream, continued on the other worker
        text = "".join(e.get("content", "") for e in events if isinstance(e.get("content"), str))
        assert text
        assert model_of(rt, holder, "smollm2-m") is None and served(rt)["smollm2-m"]["workers"] == [other]
    finally:
        for worker in ("rt-1", "rt-2"):
            admin(rt, "DELETE", f"/admin/workers/{worker}/models/smollm2-m")


def test_what_does_not_fit_is_refused_and_idle_models_sleep_until_needed(rt):
    # rt-2's budget (160 MB) holds one SmolLM2 (about 104 MB), not two.
    first = admin(rt, "POST", "/admin/workers/rt-2/models", json=second("smollm2-k", keep_alive=60))
    assert first.status_code == 201, first.text
    try:
        second_one = admin(rt, "POST", "/admin/workers/rt-2/models",
                           json=second("smollm2-c", size_mb=120))  # ... nor a model it is told takes 120 MB
        # smollm2-k is idle with a keep_alive: it is put to sleep to make room, then smollm2-c fits.
        assert second_one.status_code == 201, second_one.text
        assert model_of(rt, "rt-2", "smollm2-k")["state"] == "sleeping"
        assert model_of(rt, "rt-2", "smollm2-k")["pid"] is None
        # No room to wake smollm2-k now (smollm2-c has no keep_alive): its job gets a clear 507.
        refused = rt.post("/completion", {"model": "smollm2-k", "prompt": "Hi", "max_tokens": 4})
        assert refused.status_code == 507, refused.text
        assert refused.json()["error"]["code"] == "insufficient_memory"
        assert "memory_budget_mb" in refused.json()["error"]["message"]
        # And a load that cannot fit is refused up front, the worker unharmed.
        big = admin(rt, "POST", "/admin/workers/rt-2/models", json=second("smollm2-d"))
        assert big.status_code == 507, big.text
        err = big.json()["error"]
        assert err["code"] == "insufficient_memory" and "memory_budget_mb of 160 MB" in err["message"]
        assert err["details"]["need_mb"] > 90 and err["details"]["budget_mb"] == 160
        assert model_of(rt, "rt-2", "smollm2-d") is None

        assert admin(rt, "DELETE", "/admin/workers/rt-2/models/smollm2-c").status_code == 200
        # Room again: the next job wakes smollm2-k and runs.
        woke = rt.post("/completion", {"model": "smollm2-k", "prompt": "Hi", "max_tokens": 4})
        assert woke.status_code == 200, woke.text
        assert model_of(rt, "rt-2", "smollm2-k")["state"] == "ready"

        # keep_alive: idle past it, the model's process stops (its memory freed); the model stays offered.
        shorter = admin(rt, "PATCH", "/admin/workers/rt-2/models/smollm2-k", json={"keep_alive": 1})
        assert shorter.status_code == 200 and shorter.json()["model"]["keep_alive_s"] == 1
        wait_until(lambda: (model_of(rt, "rt-2", "smollm2-k") or {}).get("state") == "sleeping", "idle unload")
        assert "smollm2-k" in served(rt)
        wait_until(lambda: served(rt)["smollm2-k"]["loaded"] is False, "/models: not loaded while asleep")
        again = rt.post("/completion", {"model": "smollm2-k", "prompt": "Hi", "max_tokens": 4})
        assert again.status_code == 200, again.text
        wait_until(lambda: served(rt)["smollm2-k"]["loaded"] is True, "/models: loaded once woken")
    finally:
        for model in ("smollm2-c", "smollm2-k"):
            admin(rt, "DELETE", f"/admin/workers/rt-2/models/{model}")


def test_every_router_sees_the_change_within_a_heartbeat(start_router, start_worker):
    a, b = start_router({"admin_tokens": [ADMIN]}), start_router({"admin_tokens": [ADMIN]})
    start_worker(a, "rt-ha", [], wait=False, more_routers=[b])
    for router in (a, b):
        router.wait_workers({"rt-ha"})
    loaded = admin(a, "POST", "/admin/workers/rt-ha/models", json=second("smollm2-ha"))
    assert loaded.status_code == 201, loaded.text
    # The worker announces the change to every router at once (before it answers a), not at its next heartbeat
    # (0.75 s); the bound is generous for a busy test host.
    wait_until(lambda: "smollm2-ha" in served(b), "router b to see the new model", timeout=3)
    assert b.post("/completion", {"model": "smollm2-ha", "prompt": "Hi", "max_tokens": 4}).status_code == 200
    unloaded = admin(b, "DELETE", "/admin/workers/rt-ha/models/smollm2-ha")
    assert unloaded.status_code == 200, unloaded.text
    wait_until(lambda: "smollm2-ha" not in served(a), "router a to see the model gone", timeout=3)


def test_a_configured_model_that_does_not_fit_is_a_failure_not_a_crash(rt, start_worker):
    worker = start_worker(rt, "rt-small", [TEXT], worker_cfg={"memory_budget_mb": 50})
    view = admin(rt, "GET", "/admin/workers/rt-small").json()
    assert view["models"] == [] and worker.alive()
    [failure] = view["failures"]
    assert failure["model"] == FIRST and "memory_budget_mb of 50 MB" in failure["reason"]
    worker.stop()


def test_bad_changes_get_clear_errors(rt):
    cases = [
        ("POST", "/admin/workers/nobody/models", second("x"), 404, "not_found"),
        ("POST", "/admin/workers/rt-1/models", {"name": "x"}, 400, "invalid_request"),
        ("POST", "/admin/workers/rt-1/models", {**second("x"), "gpu": True}, 400, "invalid_request"),
        ("POST", "/admin/workers/rt-1/models", {"name": "x", "backend": "no-such"}, 400, "invalid_request"),
        ("POST", "/admin/workers/rt-1/models", {"name": "x", "backend": "llama-cpp", "path": "/no/such.gguf"}, 400,
         "invalid_request"),
        ("POST", "/admin/workers/rt-1/models", {**TEXT}, 409, "conflict"),
        ("DELETE", "/admin/workers/rt-1/models/no-such", None, 404, "model_not_found"),
        ("PATCH", "/admin/workers/rt-1/models/no-such", {"slots": 2}, 404, "model_not_found"),
        ("PATCH", f"/admin/workers/rt-1/models/{FIRST}", {"slots": 0}, 400, "invalid_request"),
        ("PATCH", f"/admin/workers/rt-1/models/{FIRST}", {"max_job_s": 5}, 400, "invalid_request"),
    ]
    for method, path, body, status, code in cases:
        r = admin(rt, method, path, json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (method, path, r.text)
        assert set(r.json()["error"]) >= {"code", "message", "details"}
    assert served(rt)[FIRST]["workers"] == ["rt-1"]  # nothing changed


def test_the_dashboard_shows_each_workers_models_and_their_state(rt):
    sync_api = pytest.importorskip("playwright.sync_api", reason="the dashboard check needs playwright")
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("the dashboard check needs Debian's chromium at /usr/bin/chromium")
    loaded = admin(rt, "POST", "/admin/workers/rt-2/models", json=second("smollm2-z", keep_alive=1))
    assert loaded.status_code == 201, loaded.text
    try:
        wait_until(lambda: (model_of(rt, "rt-2", "smollm2-z") or {}).get("state") == "sleeping", "idle unload")
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium",
                                         args=["--headless", "--no-sandbox", "--disable-gpu"])
            try:
                page = browser.new_page()
                page.set_default_timeout(15_000)
                page.goto(rt.url + "/dashboard")
                page.fill("#token", TOKEN)
                page.click("#token-submit")
                row = page.locator('#workers [data-worker="rt-2"] [data-model="smollm2-z"]')
                sync_api.expect(row).to_have_attribute("data-state", "sleeping")
                sync_api.expect(row.locator(".model-state")).to_have_text("asleep")
                first = page.locator(f'#workers [data-worker="rt-1"] [data-model="{FIRST}"]')
                sync_api.expect(first).to_have_attribute("data-state", "ready")
                sync_api.expect(first.locator(".model-state")).to_have_count(0)
            finally:
                browser.close()
    finally:
        admin(rt, "DELETE", "/admin/workers/rt-2/models/smollm2-z")
