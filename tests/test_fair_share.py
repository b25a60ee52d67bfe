"""Fair share between tokens on a real router and worker: a token that floods a model's queue does not hold
back another token's requests (router/fairqueue.py; docs/deployment.md "Fair share")."""

from __future__ import annotations

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
