"""Scenario 1, router overhead: the zero-work benchmark backend through HTTP → router → ZeroMQ → worker → back,
against the same backend called in process, and against two floors with no mesh code at all (bench/floor.py).

The mesh and both floors run side by side, and every point is measured ``rounds`` times with the three
systems in turn, so that a slow minute of a shared machine falls on all of them; the table gives medians."""

from __future__ import annotations

import json
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import wrk
from .cluster import Cluster, CpuMeter, Proc, free_port
from .common import ECHO, ROOT, Log, Profiler, Settings, loadgen, pct, wait_port

BODY = {"prompt": "Hello", "n_predict": 16}  # llama.cpp's dialect, as LLM for Unity sends it

# Below saturation: this many clients, offered these shares of the closed-loop rate (wrk only).
PACED_CONCURRENCY = 16
PACED_SHARES = (0.25, 0.5)


def in_process(n: int = 20000) -> dict[str, float]:
    """The benchmark backend's run() called directly, n times: what a request costs with no router."""
    from velesio.backends import JobContext, ModelConfig, TextParams
    from velesio.backends.benchmark import BenchmarkBackend
    from velesio.mesh.jobs import Job

    backend = BenchmarkBackend(ModelConfig(name="benchmark-echo", backend="benchmark"))
    backend.load()
    times = []
    perf = time.perf_counter
    for _ in range(n):
        job = Job(op="completion", model="benchmark-echo", params=TextParams(prompt="Hello", max_tokens=16))
        t0 = perf()
        backend.run(job, JobContext(job, lambda chunk: None))
        times.append(perf() - t0)
    return {"p50_ms": pct(times, 50) * 1e3, "p99_ms": pct(times, 99) * 1e3, "calls_per_s": n / sum(times)}


def client_name(s: Settings) -> str:
    return "wrk" if s.client == "wrk" and wrk.available() else "python"


def requests_load(s: Settings, url: str, headers: dict[str, str], body: dict[str, Any], concurrency: int,
                  meter: CpuMeter | None = None) -> dict[str, Any]:
    """A closed loop of ``concurrency`` clients: warm-up, then ``s.duration`` seconds measured (``meter``
    runs over the measured part only). wrk when installed and asked for, else the Python load generator."""
    if client_name(s) == "wrk":
        wrk.run(url, headers, body, concurrency=concurrency, duration_s=s.warmup)
        if meter is not None:
            meter.start()
        return wrk.run(url, headers, body, concurrency=concurrency, duration_s=s.duration)
    if meter is not None:
        meter.start()  # the Python client counts CPU over its warm-up too (completed_all)
    res = loadgen({"mode": "requests", "url": url, "headers": headers, "body": body, "concurrency": concurrency,
                   "warmup": s.warmup, "duration": s.duration})
    lat = [x / 1e3 for x in res["latencies_us"]]
    return {**res, "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}


def start_floor(s: Settings, kind: str, reply_size: int, workdir: Path) -> tuple[Proc, str]:
    """bench/floor.py: bare aiohttp ("http"), or bare aiohttp with a ZeroMQ echo hop ("zmq")."""
    port = free_port()
    extra = [f"tcp://127.0.0.1:{free_port()}"] if kind == "zmq" else []
    proc = Proc([sys.executable, "-m", "bench.floor", kind, str(port), str(reply_size), *extra],
                workdir / f"floor-{kind}.log", env={"PYTHONPATH": str(ROOT), "VELESIO_LOOP": s.loop})
    wait_port(port, proc)
    return proc, f"http://127.0.0.1:{port}/completion"


def _median(points: list[dict[str, Any]], key: str) -> float:
    values = [p[key] for p in points if p.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def overhead(s: Settings, workdir: Path, log: Log) -> dict[str, Any]:
    base = in_process()
    log(f"  in-process run(): p50 {base['p50_ms'] * 1e3:.1f} us, p99 {base['p99_ms'] * 1e3:.1f} us; "
        f"load from {client_name(s)}, {s.rounds} round(s)")
    points: dict[tuple[str, int], list[dict[str, Any]]] = {}
    floors: dict[str, tuple[Proc, str]] = {}
    with Cluster(workdir, loop=s.loop) as mesh:
        mesh.start_router()
        mesh.start_workers(["bench-1"], [ECHO])
        req = urllib.request.Request(mesh.url + "/completion", data=json.dumps(BODY).encode(), headers=mesh.headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            reply_size = len(r.read())
        try:
            if s.floor:
                for kind in ("http", "zmq"):
                    floors[kind] = start_floor(s, kind, reply_size, workdir)
            with Profiler(s, mesh.router.pid, "overhead", log):
                for _ in range(s.rounds):
                    for c in s.concurrencies:
                        meter = CpuMeter(mesh.pids())
                        res = requests_load(s, mesh.url + "/completion", mesh.headers, BODY, c, meter)
                        cpu = meter.stop()
                        total = max(1, res["completed_all"])  # CPU was metered over what the client counted
                        point = {**res, "rps": res["completed"] / res["window_s"],
                                 "router_cpu_us": cpu["router"] / total * 1e6,
                                 "worker_cpu_us": cpu["worker:bench-1"] / total * 1e6,
                                 "client_cpu_us": res["cpu_s"] / total * 1e6}
                        points.setdefault(("mesh", c), []).append(point)
                        log(f"  c={c:<4} {point['rps']:8.0f} req/s  p50 {res['p50_ms']:.2f} ms  "
                            f"p99 {res['p99_ms']:.2f} ms  router {point['router_cpu_us']:.0f} us/req  "
                            f"worker {point['worker_cpu_us']:.0f} us/req  client {point['client_cpu_us']:.0f} us/req"
                            f"  errors {res['errors']}")
                        for kind, (_proc, url) in floors.items():
                            res = requests_load(s, url, {"Content-Type": "application/json"}, BODY, c)
                            points.setdefault((kind, c), []).append({**res, "rps": res["completed"] / res["window_s"]})
                            log(f"    floor ({kind}) {res['completed'] / res['window_s']:8.0f} req/s  "
                                f"p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms")
            paced = paced_points(s, mesh, points.get(("mesh", PACED_CONCURRENCY)), log)
        finally:
            for proc, _url in floors.values():
                proc.stop()
    rows, floor_rows = [], {"http": [], "zmq": []}
    for c in s.concurrencies:
        runs = points[("mesh", c)]
        p50, p99 = _median(runs, "p50_ms"), _median(runs, "p99_ms")
        rows.append({"concurrency": c, "rounds": len(runs), "rps": _median(runs, "rps"),
                     "rps_runs": [round(p["rps"]) for p in runs], "p50_ms": p50, "p99_ms": p99,
                     "added_p50_ms": p50 - base["p50_ms"], "added_p99_ms": p99 - base["p99_ms"],
                     "router_cpu_us": _median(runs, "router_cpu_us"), "worker_cpu_us": _median(runs, "worker_cpu_us"),
                     "client_cpu_us": _median(runs, "client_cpu_us"), "errors": sum(p["errors"] for p in runs),
                     "error_sample": [e for p in runs for e in p["error_sample"]][:3]})
        for kind in floors:
            fr = points[(kind, c)]
            floor_rows[kind].append({"concurrency": c, "rps": _median(fr, "rps"), "p50_ms": _median(fr, "p50_ms"),
                                     "p99_ms": _median(fr, "p99_ms")})
    for p in paced:
        p["added_p50_ms"], p["added_p99_ms"] = p["p50_ms"] - base["p50_ms"], p["p99_ms"] - base["p99_ms"]
    return {"in_process": base, "reply_bytes": reply_size, "client": client_name(s), "rounds": s.rounds,
            "rows": rows, "floor": floor_rows["http"], "floor_zmq": floor_rows["zmq"], "paced": paced}


def paced_points(s: Settings, mesh: Cluster, closed: list[dict[str, Any]] | None, log: Log) -> list[dict[str, Any]]:
    """Latency with the router below saturation: in a closed loop latency is N ÷ throughput, so it measures
    the queue as much as the path. Here each client waits between requests (a random think time, mean T)
    chosen so that the clients would offer a share of the closed-loop rate if requests took no time (they
    offer a little less; the table gives what was measured)."""
    if not closed or client_name(s) != "wrk":
        return []
    rps = _median(closed, "rps")
    out = []
    for share in PACED_SHARES:
        think_ms = max(1.0, PACED_CONCURRENCY / (share * rps) * 1e3)
        wrk.run(mesh.url + "/completion", mesh.headers, BODY, concurrency=PACED_CONCURRENCY,
                duration_s=s.warmup, think_ms=think_ms)
        res = wrk.run(mesh.url + "/completion", mesh.headers, BODY, concurrency=PACED_CONCURRENCY,
                      duration_s=s.duration, think_ms=think_ms)
        point = {"concurrency": PACED_CONCURRENCY, "share": share, "think_ms": think_ms,
                 "rps": res["completed"] / res["window_s"], "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"],
                 "errors": res["errors"]}
        out.append(point)
        log(f"  c={PACED_CONCURRENCY} paced (think {think_ms:.1f} ms, {share:.0%} of {rps:.0f} req/s): "
            f"{point['rps']:.0f} req/s  p50 {res['p50_ms']:.2f} ms  p99 {res['p99_ms']:.2f} ms")
    return out
