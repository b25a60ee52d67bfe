"""The benchmark suite runs: real processes, a table and JSON with numbers (no speed is asserted here;
speed targets live in the benchmark's own report, docs/performance.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
