"""Soak: run the mesh at saturation for N minutes and report router/worker RSS and open file descriptors.

    python -m bench.soak --minutes 10 [--concurrency 16] [--interval 10]

Starts a real router and one SmolLM2 worker on loopback, keeps ``concurrency`` clients busy with a mix of
short and streamed completions, cancelled streams and bad requests, samples /proc every ``interval``
seconds, and prints a table (and the growth from the first sample to the last). Not part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from .cluster import child_of_this_process

TOKEN = "soak-token"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def client(session: aiohttp.ClientSession, url: str, stop: float, counts: dict[str, int]) -> None:
    rng = random.Random()
    headers = {"Authorization": f"Bearer {TOKEN}"}
    while time.monotonic() < stop:
        kind = rng.choice(["short", "short", "stream", "cancel", "bad"])
        try:
            if kind == "short":
                async with session.post(url + "/completion", json={"prompt": "Hello", "max_tokens": 8},
                                        headers=headers) as r:
                    await r.read()
            elif kind == "stream":
                async with session.post(url + "/v1/chat/completions", headers=headers, json={
                        "messages": [{"role": "user", "content": "Tell me a joke"}], "max_tokens": 24,
                        "stream": True}) as r:
                    await r.read()
            elif kind == "cancel":
                async with session.post(url + "/completion", json={"prompt": "Story:", "max_tokens": 400,
                                                                   "stream": True}, headers=headers) as r:
                    await r.content.readline()
            else:
                async with session.post(url + "/completion", data=b"{bad", headers=headers) as r:
                    await r.read()
            counts[f"{kind}:{r.status}"] = counts.get(f"{kind}:{r.status}", 0) + 1
        except aiohttp.ClientError as exc:
            counts[f"{kind}:{type(exc).__name__}"] = counts.get(f"{kind}:{type(exc).__name__}", 0) + 1


async def soak(url: str, pids: dict[str, int], minutes: float, concurrency: int, interval: float) -> None:
    stop = time.monotonic() + minutes * 60
    counts: dict[str, int] = {}
    samples = []
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(client(session, url, stop, counts)) for _ in range(concurrency)]
        start = time.monotonic()
        print(f"{'t (s)':>7} " + " ".join(f"{name + ' RSS MB':>16} {name + ' fds':>12}" for name in pids)
              + f" {'requests':>9}", flush=True)
        while time.monotonic() < stop:
            row = {name: (rss_mb(pid), open_fds(pid)) for name, pid in pids.items()}
            samples.append(row)
            print(f"{time.monotonic() - start:7.0f} " + " ".join(f"{r:16.1f} {f:12d}" for r, f in row.values())
                  + f" {sum(counts.values()):9d}", flush=True)
            await asyncio.sleep(min(interval, max(0.0, stop - time.monotonic())))
        await asyncio.gather(*tasks)
    first, last = samples[0], {name: (rss_mb(pid), open_fds(pid)) for name, pid in pids.items()}
    print("\ngrowth over the run:")
    for name in pids:
        print(f"  {name}: RSS {first[name][0]:.1f} -> {last[name][0]:.1f} MB, fds {first[name][1]} -> {last[name][1]}")
    print("answers:", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=5)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--interval", type=float, default=10)
    args = p.parse_args(argv)
    bin_dir = Path(sys.executable).parent
    port, mesh = free_port(), f"tcp://127.0.0.1:{free_port()}"
    tmp = Path(tempfile.mkdtemp(prefix="velesio-soak-"))
    (tmp / "mesh.yaml").write_text(
        "router:\n  rate_limit: {requests_per_minute: 100000000, concurrent: 100000}\n  queue_max: 100000\n"
        "worker:\n  models:\n"
        "    - {name: smollm2-135m-instruct, backend: llama-cpp, slots: 2, options: {n_threads: 1}}\n")
    env = {**os.environ, "API_TOKENS": TOKEN}
    logs = open(tmp / "mesh.log", "wb")
    router = subprocess.Popen([str(bin_dir / "velesio-router"), "--config", str(tmp / "mesh.yaml"), "--host",
                               "127.0.0.1", "--port", str(port), "--mesh-bind", mesh, "--log-level", "WARNING"],
                              env=env, stdout=logs, stderr=subprocess.STDOUT, preexec_fn=child_of_this_process())
    worker = subprocess.Popen([str(bin_dir / "velesio-worker"), "--router", mesh, "--config", str(tmp / "mesh.yaml"),
                               "--name", "soak", "--log-level", "WARNING"], env=env, stdout=logs,
                              stderr=subprocess.STDOUT, preexec_fn=child_of_this_process())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        import json
        import urllib.request
        while time.monotonic() < deadline:
            try:
                if json.load(urllib.request.urlopen(url + "/health", timeout=2))["workers"]:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        else:
            print("the mesh did not come up; see", tmp / "mesh.log", file=sys.stderr)
            return 1
        asyncio.run(soak(url, {"router": router.pid, "worker": worker.pid}, args.minutes, args.concurrency,
                         args.interval))
    finally:
        for proc in (worker, router):
            proc.send_signal(signal.SIGTERM)
        for proc in (worker, router):
            proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
