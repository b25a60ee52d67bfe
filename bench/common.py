"""What the scenarios share: their settings, percentiles, the Python load generator, py-spy."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cluster import Proc

ROOT = Path(__file__).resolve().parent.parent
ECHO = {"name": "benchmark-echo", "backend": "benchmark", "slots": 64, "options": {}}


@dataclasses.dataclass
class Settings:
    duration: float = 3.0  # seconds measured per point (after the warm-up)
    warmup: float = 1.0
    concurrencies: tuple[int, ...] = (1, 16, 64, 256)
    floor: bool = True  # also measure the floors (bare aiohttp; aiohttp with a ZeroMQ echo hop)
    rounds: int = 3  # overhead: each point measured this many times, the systems in turn; medians reported
    stream_tokens: int = 1000
    stream_concurrencies: tuple[int, ...] = (1, 64)
    stream_rounds: int = 2  # at least, per concurrency
    e2e_tokens: int = 96
    e2e_reps: int = 12
    e2e_threads: int = 2
    scaling_workers: tuple[int, ...] = (1, 2, 4, 8)
    scaling_delay_ms: int = 50
    idle_streams: int = 1000
    # two workers per host (bench/twoworkers.py)
    two_clients: int = 16
    two_requests: int = 32  # per loaded phase, shared by the clients
    two_idle: int = 5  # requests one client sends alone: the idle latency
    two_max_tokens: tuple[int, ...] = (16, 64)
    two_deadline_s: float = 45.0  # a loaded phase ends here; requests still open count as unanswered
    two_threads: int | None = None  # (b): n_threads given through options instead of the worker's share
    # routing (bench/routing.py): cache-aware vs least-loaded, and fair share
    routing_rounds: int = 2  # each mode this many times, in turn; medians reported
    routing_workers: int = 4
    routing_slots: int = 4  # per worker
    routing_threads: int = 1  # llama.cpp threads per worker
    routing_cache_sequences: int = 8  # per worker: sequences beyond the slots that keep conversations cached
    routing_conversations: int = 32
    routing_turns: int = 6
    routing_max_tokens: int = 16
    fair_flood: int = 200
    fair_b_requests: int = 10
    fair_max_tokens: int = 8
    prefix_rounds: int = 5  # prefix cache: conversations, each a cold first turn and a cached second
    # side by side with llama.cpp's llama-server (bench/peer.py)
    server_concurrencies: tuple[int, ...] = (1, 4, 8, 16)
    server_tokens: int = 64  # n_predict of every request (EOS ignored)
    server_n_ctx: int = 512  # context per sequence (llama-server: -c n_ctx × C, not unified)
    server_threads: int = 2  # llama.cpp threads (-t/-tb; options.n_threads/n_threads_batch)
    server_duration: float = 12.0  # seconds measured per system, concurrency and round (after the warm-up)
    server_warmup: float = 3.0
    server_rounds: int = 3  # the systems in turn, the order rotating; medians reported
    server_systems: tuple[str, ...] = ("llama-server", "batched", "contexts")
    server_probe: bool = True  # client 0 streams: the client-observed TTFT
    server_quiet_wait: float = 120.0  # before each run, wait up to this long for other processes to go quiet
    server_max_foreign: float = 0.1  # a run during which other processes used more of the CPU is measured again
    server_attempts: int = 3  # ... at most this many times (the last is kept, marked noisy)
    # several completions of one long prompt, side by side with llama-server (bench/choices.py)
    choices_n: int = 4  # n_cmpl: completions per request (and sequences per system)
    choices_prompt_tokens: int = 900
    choices_tokens: int = 32  # n_predict of each completion
    choices_n_ctx: int = 1024  # context per sequence
    choices_rounds: int = 3
    llama_server: str | None = None  # the binary (default: LLAMA_SERVER, then make llama-server's, then PATH)
    loop: str = "uvloop"  # the router's and workers' event loop (VELESIO_LOOP): uvloop or asyncio
    profile: bool = False  # py-spy the router during scenarios 1 and 2
    client: str = "wrk"  # scenario 1's load generator: wrk (when installed) or python (bench/loadgen.py)
    results: Path = ROOT / "bench" / "results"

    @classmethod
    def quick(cls, **kw: Any) -> Settings:
        return cls(duration=1.5, warmup=0.5, rounds=1, stream_tokens=500, stream_rounds=1, e2e_reps=2,
                   scaling_workers=(1, 2, 4), scaling_delay_ms=50, idle_streams=200, two_requests=16, two_idle=3,
                   two_deadline_s=20.0, routing_rounds=1, routing_conversations=8, routing_turns=3, fair_flood=40,
                   fair_b_requests=3, server_concurrencies=(1, 4), server_duration=4.0,
                   server_warmup=1.0, server_rounds=1, server_quiet_wait=10.0, choices_rounds=1, **kw)


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

    def __enter__(self) -> Profiler:
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


def wait_port(port: int, proc: Proc, timeout: float = 30) -> None:
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
