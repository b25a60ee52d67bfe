"""Several routers share one pool of workers (docs/deployment.md "Several routers"): no request is refused
for want of a slot another router holds, no worker runs more jobs than its slots, and when a router is
killed, clients that retry on another lose nothing and the restarted router is back within 2 s."""

from __future__ import annotations

import concurrent.futures
import re
import signal
import time

from conftest import SMOLLM2, free_port
from velesio.client import Client

BODY = {"prompt": "Name three colours:", "max_tokens": 16, "temperature": 0}


def most_at_once(log: str) -> int:
    """The most jobs a worker's log shows running at the same time (its own count, from start and end lines)."""
    running = peak = 0
    for line in log.splitlines():
        if re.search(r"job \S+ attempt \d+: \S+ on ", line):
            running += 1
            peak = max(peak, running)
        elif re.search(r"job \S+ attempt \d+ on \S+: ", line):
            running -= 1
    return peak


def test_two_routers_share_two_workers_without_refusals_or_overcommit(start_router, start_worker):
    a, b = start_router(), start_router()
    workers = [start_worker(a, name, [SMOLLM2], wait=False, more_routers=[b], args=["--log-level", "DEBUG"])
               for name in ("shared-1", "shared-2")]
    for router in (a, b):
        router.wait_workers({"shared-1", "shared-2"})
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: (a if i % 2 else b).post("/completion", BODY), range(24)))
    assert [r.status_code for r in replies] == [200] * 24, [r.text for r in replies if r.status_code != 200]
    for worker in workers:
        assert most_at_once(worker.log) <= 1, worker.log[-3000:]


def test_a_killed_router_loses_nothing_for_clients_that_retry(start_router, start_worker):
    port, mesh_port = free_port(), free_port()
    a, b = start_router(port=port, mesh_port=mesh_port), start_router()
    for name in ("ha-1", "ha-2"):
        start_worker(a, name, [SMOLLM2], wait=False, more_routers=[b])
    for router in (a, b):
        router.wait_workers({"ha-1", "ha-2"})

    def ask(i: int) -> str:
        urls = [a.url, b.url] if i % 2 else [b.url, a.url]
        return Client(urls, a.token, max_retries=3).complete(f"Count to {i}:", max_tokens=24).text

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, i) for i in range(16)]
        deadline = time.monotonic() + 30
        while a.get("/queue/status").json()["running_jobs"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        a.proc.signal(signal.SIGKILL)  # with requests in flight through it
        a.proc.popen.wait(5)
        texts = [f.result(120) for f in futures]
    assert all(isinstance(t, str) for t in texts) and len(texts) == 16
    assert b.post("/completion", BODY).status_code == 200  # the other router never paused
    a2 = start_router(port=port, mesh_port=mesh_port)
    back = time.monotonic()
    a2.wait_workers({"ha-1", "ha-2"}, timeout=10)
    assert time.monotonic() - back <= 2.0
    assert a2.post("/completion", BODY).status_code == 200
