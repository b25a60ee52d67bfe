"""The scenarios, by name. Each starts its own processes, measures, stops them, and returns plain data.
Router overhead is in bench/overhead.py, end to end in bench/e2e.py, two workers per host in
bench/twoworkers.py and the side by side with llama.cpp's server in bench/peer.py (several completions of
one prompt: bench/choices.py)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .choices import choices
from .cluster import Cluster, CpuMeter, rss_mb
from .common import ECHO, ROOT, Log, Profiler, Settings, loadgen, pct
from .e2e import end_to_end
from .overhead import overhead
from .peer import peer_server
from .routing import affinity, fairness, prefix_cache
from .twoworkers import two_workers

__all__ = ["SCENARIOS", "Settings"]


# ---- 2. stream relay -------------------------------------------------------------------------
def stream_summary(res: dict[str, Any], expect_tokens: int | None) -> dict[str, Any]:
    streams = [st for r in res["rounds"] for st in r["streams"]]
    good = [st for st in streams if st.get("ok")]
    rates = [sum(st["tokens"] for st in r["streams"] if st.get("ok")) / r["wall"] for r in res["rounds"]]
    per_stream = [(st["tokens"] - 1) / (st["t_last"] - st["ttft"]) for st in good
                  if st["t_last"] and st["ttft"] is not None and st["t_last"] > st["ttft"] and st["tokens"] > 1]
    ttft = [st["ttft"] * 1e3 for st in good if st["ttft"] is not None]
    return {"streams": len(streams), "failed": len(streams) - len(good),
            "error_sample": [st.get("error") for st in streams if not st.get("ok")][:3],
            "tokens_per_s": statistics.median(rates) if rates else float("nan"),
            "stream_tokens_per_s": statistics.median(per_stream) if per_stream else float("nan"),
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99),
            "tokens_ok": expect_tokens is None or all(st["tokens"] == expect_tokens for st in good),
            "total_s_p50": pct([st["total"] for st in good], 50),
            "tokens": sum(st["tokens"] for st in good)}


def stream_relay(s: Settings, workdir: Path, log: Log) -> dict[str, Any]:
    body = {"prompt": "Hi", "n_predict": s.stream_tokens, "ignore_eos": True, "stream": True}
    rows = []
    with Cluster(workdir, loop=s.loop) as mesh:
        mesh.start_router()
        mesh.start_workers(["bench-1"], [ECHO])
        with Profiler(s, mesh.router.pid, "stream", log):
            for c in s.stream_concurrencies:
                failovers = mesh.failovers()
                meter = CpuMeter(mesh.pids())
                meter.start()
                res = loadgen({"mode": "streams", "url": mesh.url + "/completion", "headers": mesh.headers,
                               "body": body, "concurrency": c, "duration": s.duration if c == 1 else 0,
                               "min_rounds": max(s.stream_rounds, 3) if c == 1 else s.stream_rounds,
                               "warmup_rounds": 1 if c == 1 else 0})
                cpu = meter.stop()
                row = {"concurrency": c, **stream_summary(res, s.stream_tokens)}
                after = mesh.failovers()
                row["failovers"] = after - failovers if after is not None and failovers is not None else None
                # The framing check reads raw HTTP chunks (aiohttp's client may merge them when it lags).
                framing = loadgen({"mode": "framing", "url": mesh.url + "/completion", "headers": mesh.headers,
                                   "body": body, "concurrency": c})
                row["one_event_per_chunk"] = framing["chunks_other"] == 0 and framing["chunks_one_event"] > 0
                row["framing"] = framing
                tokens_all = row["tokens"] + res["warmup_tokens"]
                row["router_cpu_us_per_token"] = cpu["router"] / max(1, tokens_all) * 1e6
                row["worker_cpu_us_per_token"] = cpu["worker:bench-1"] / max(1, tokens_all) * 1e6
                row["client_cpu_us_per_token"] = res["cpu_s"] / max(1, tokens_all) * 1e6
                rows.append(row)
                log(f"  c={c:<3} {row['tokens_per_s']:8.0f} tokens/s  TTFT p50 {row['ttft_p50_ms']:.2f} ms "
                    f"p99 {row['ttft_p99_ms']:.2f} ms  router {row['router_cpu_us_per_token']:.1f} us/token  "
                    f"worker {row['worker_cpu_us_per_token']:.1f} us/token  "
                    f"client {row['client_cpu_us_per_token']:.1f} us/token  "
                    f"tokens ok {row['tokens_ok']}  one event per chunk {row['one_event_per_chunk']}  "
                    f"failovers {row['failovers']}")
    return {"tokens_per_stream": s.stream_tokens, "rows": rows}


# ---- 4. scaling ------------------------------------------------------------------------------
def scaling(s: Settings, workdir: Path, log: Log) -> dict[str, Any]:
    model = {"name": "benchmark-sleep", "backend": "benchmark", "slots": 1,
             "options": {"delay_ms": s.scaling_delay_ms}}
    body = {"model": "benchmark-sleep", "prompt": "Hello", "n_predict": 16}
    rows = []
    per_job = s.scaling_delay_ms / 1000
    with Cluster(workdir, loop=s.loop) as mesh:
        mesh.start_router()
        for n in s.scaling_workers:
            missing = [f"w{i + 1}" for i in range(n) if f"w{i + 1}" not in mesh.workers]
            if missing:
                mesh.start_workers(missing, [model])
            before = mesh.jobs_done()
            res = loadgen({"mode": "requests", "url": mesh.url + "/completion", "headers": mesh.headers,
                           "body": body, "concurrency": 2 * n, "warmup": s.warmup, "duration": s.duration * 1.5})
            after = mesh.jobs_done()
            jobs = [after.get(w, 0) - before.get(w, 0) for w in sorted(mesh.workers)]
            rps = res["completed"] / res["window_s"]
            rows.append({"workers": n, "rps": rps, "ideal_rps": n / per_job, "jobs_per_worker": jobs,
                         "balance": min(jobs) / max(jobs) if max(jobs) else float("nan"),
                         "p50_ms": pct([x / 1e3 for x in res["latencies_us"]], 50), "errors": res["errors"]})
            log(f"  workers={n}  {rps:6.1f} req/s (ideal {n / per_job:.0f})  jobs per worker {jobs}")
    one = rows[0]["rps"] if rows and rows[0]["workers"] == 1 else None
    for row in rows:
        row["speedup"] = row["rps"] / one if one else float("nan")
        row["efficiency"] = row["speedup"] / row["workers"] if one else float("nan")
    return {"delay_ms": s.scaling_delay_ms, "rows": rows}


# ---- 5. memory -------------------------------------------------------------------------------
def memory(s: Settings, workdir: Path, log: Log) -> dict[str, Any]:
    n = s.idle_streams
    # Every stream is dispatched to a worker slot whose job waits (cancellably) an hour before its first token.
    model = {"name": "benchmark-idle", "backend": "benchmark", "slots": n, "options": {"delay_ms": 3_600_000}}
    body = {"model": "benchmark-idle", "prompt": "Hello", "n_predict": 16, "stream": True}
    with Cluster(workdir, loop=s.loop) as mesh:
        mesh.start_router()
        mesh.start_workers(["idle-1"], [model, {**ECHO, "slots": 1}])
        # Warm the router up (first requests, first streams) before the baseline.
        loadgen({"mode": "streams", "url": mesh.url + "/completion", "headers": mesh.headers, "concurrency": 4,
                 "body": {"model": "benchmark-echo", "prompt": "x", "n_predict": 4, "stream": True},
                 "min_rounds": 3, "warmup_rounds": 0})
        time.sleep(0.5)
        idle = rss_mb(mesh.router.pid)
        proc = subprocess.Popen([sys.executable, "-m", "bench.loadgen", json.dumps({
            "mode": "hold", "url": mesh.url + "/completion", "headers": mesh.headers, "body": body, "count": n})],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ,
                                                                                    "PYTHONPATH": str(ROOT)})
        try:
            line = proc.stdout.readline()
            opened = int(line.split()[1]) if line.startswith("READY") else 0
            in_flight = mesh.wait_for(lambda h: sum(w["jobs_in_flight"] for w in h["workers"]) >= opened, 60)
            time.sleep(1.0)
            held = rss_mb(mesh.router.pid)
            in_flight = sum(w["jobs_in_flight"] for w in in_flight["workers"])
        finally:
            proc.stdin.write("\n")
            proc.stdin.flush()
            out, _ = proc.communicate(timeout=60)
        time.sleep(1.0)
        after = rss_mb(mesh.router.pid)
    per = (held - idle) * 1024 / max(1, opened)
    log(f"  router RSS idle {idle:.1f} MB, with {opened} open streams {held:.1f} MB "
        f"({per:.1f} KB per stream), after closing them {after:.1f} MB")
    return {"streams": n, "opened": opened, "jobs_in_flight": in_flight, "rss_idle_mb": idle,
            "rss_open_mb": held, "rss_after_mb": after, "kb_per_stream": per,
            "client": json.loads(out.strip().splitlines()[-1]) if out.strip() else {}}


SCENARIOS: dict[str, Callable[[Settings, Path, Log], dict[str, Any]]] = {
    "overhead": overhead, "stream": stream_relay, "e2e": end_to_end, "scaling": scaling, "memory": memory,
    "two-workers": two_workers, "affinity": affinity, "fairness": fairness, "prefix": prefix_cache,
    "server": peer_server, "choices": choices}
