"""Routing on a real router and workers: a token that floods a model's queue does not hold back another
token's requests (router/fairqueue.py; docs/deployment.md "Fair share"), and a conversation's next turn goes
to the worker that served the last one while that worker is free (router/affinity.py)."""

from __future__ import annotations

import re
import threading
import time

import requests

from conftest import SMOLLM2

BODY = {"prompt": "Count from one to twenty:", "max_tokens": 12, "temperature": 0}


def test_a_flooding_token_does_not_hold_back_another(start_router, start_worker):
    router = start_router({"token_limits": {name: {"requests_per_minute": 100000, "concurrent": 1000}
                                            for name in ("token-1", "token-2")}}, token="tok-a,tok-b")
    start_worker(router, "fair-1", [SMOLLM2])
    flood, done = 24, []

    def client_a() -> None:
        r = requests.post(router.url + "/v1/completions", json=BODY, timeout=600,
                          headers={"Authorization": "Bearer tok-a"})
        assert r.status_code == 200, r.text
        done.append(time.monotonic())

    threads = [threading.Thread(target=client_a) for _ in range(flood)]
    for t in threads:
        t.start()
    # Wait until A's flood is queued behind the one slot.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = requests.get(router.url + "/queue/status", headers={"Authorization": "Bearer tok-b"}, timeout=10)
        if status.json()["queue_depth"] >= flood // 2:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"A's requests never queued: {status.json()}")
    before = len(done)
    r = requests.post(router.url + "/v1/completions", json=BODY, timeout=600,
                      headers={"Authorization": "Bearer tok-b"})
    assert r.status_code == 200, r.text
    after = len(done)
    # B's request ran after at most the job in progress and one of A's (stride order), not behind the flood.
    assert after - before <= 2, (before, after)
    for t in threads:
        t.join(600)
    assert len(done) == flood


SYSTEM = ("You are Mira, the innkeeper of the Silver Stag, a tavern in a mountain village. You answer guests "
          "briefly and kindly, in one sentence.")


def worker_of(router, response) -> str:
    """The worker the router's log says ran the request (its job id is the response's X-Request-Id)."""
    job = response.headers["X-Request-Id"]
    log = router.proc.wait_for_log(f"job {job} ", timeout=10)
    found = re.search(rf"job {job} \S+ on \S+ by (\S+)", log)
    assert found, log[-2000:]
    return found.group(1)


def test_a_conversation_stays_on_its_worker_until_that_worker_is_busy(start_router, start_worker):
    router = start_router()
    for name in ("home-1", "home-2"):
        start_worker(router, name, [SMOLLM2], wait=False)
    router.wait_workers({"home-1", "home-2"})
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Do you have a room tonight?"}]

    def turn(extra: list[dict[str, str]], **kw):
        body = {"messages": messages + extra, "max_tokens": 8, "temperature": 0, **kw}
        return router.post("/v1/chat/completions", body, stream=kw.get("stream", False))

    first = turn([])
    assert first.status_code == 200, first.text
    home = worker_of(router, first)
    reply = {"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]}
    messages.append(reply)
    for question in ("How much is it?", "Is breakfast included?"):
        r = turn([{"role": "user", "content": question}])
        assert r.status_code == 200 and worker_of(router, r) == home
    # A long turn keeps the home busy; the next one goes to the other worker rather than wait for its cache.
    long = turn([{"role": "user", "content": "Tell me the whole history of the village."}], stream=True,
                max_tokens=400, ignore_eos=True)
    lines = long.iter_lines()
    assert next(line for line in lines if line)  # it runs
    other = turn([{"role": "user", "content": "Where is the stable?"}])
    assert other.status_code == 200 and worker_of(router, other) != home
    long.close()
