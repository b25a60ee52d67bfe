"""Real router and worker processes on loopback, as an operator starts them, plus what /proc says of them."""

from __future__ import annotations

import ctypes
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

TOKEN = "bench-token"
BIN = Path(sys.executable).parent

# The router's limits are opened up so that only its own speed is measured.
ROUTER_CONFIG = {"rate_limit": {"requests_per_minute": 10_000_000, "concurrent": 100_000},
                 "queue_max": 100_000}


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Linux: the kernel kills this process (SIGKILL) when its parent dies, so that a benchmark killed
    mid-run (a timeout's SIGTERM, SIGKILL) leaves no router, worker, floor or echo process behind. Called in
    the child: as Popen's ``preexec_fn`` (``child_of_this_process``), or first thing in a child's own code."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def child_of_this_process() -> functools.partial[None]:
    """A ``preexec_fn`` for Popen: the child dies with this process (``die_with_parent``)."""
    return functools.partial(die_with_parent, os.getpid())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    """Resident set size (VmRSS) in MB, from /proc/PID/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Proc:
    """A child process in its own session, its output in a log file; it dies with this process."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.args = args
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.popen = subprocess.Popen(args, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env={**os.environ, **(env or {})}, start_new_session=True,
                                      preexec_fn=child_of_this_process())

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10, kill: bool = False) -> None:
        if self.alive():
            os.kill(self.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        self._log.close()


class Cluster:
    """One router and any number of workers. Use as a context manager: everything stops on exit."""

    def __init__(self, workdir: Path, *, loop: str = "uvloop", router_cfg: dict[str, Any] | None = None,
                 worker_env: dict[str, str] | None = None, api_tokens: str = TOKEN):
        self.api_tokens = api_tokens  # API_TOKENS: comma-separated, named token-1, token-2, ... in order
        self.workdir = workdir
        self.loop = loop
        self.router_cfg = {**ROUTER_CONFIG, **(router_cfg or {})}
        self.worker_env = worker_env or {}
        self.router: Proc | None = None
        self.workers: dict[str, Proc] = {}
        self.port = 0
        self.mesh = ""
        self._n = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def _path(self, stem: str, suffix: str) -> Path:
        self._n += 1
        return self.workdir / f"{stem}-{self._n}{suffix}"

    def start_router(self) -> None:
        self.port = free_port()
        self.mesh = f"tcp://127.0.0.1:{free_port()}"
        cfg = self._path("router", ".yaml")
        cfg.write_text(yaml.safe_dump({"router": self.router_cfg}))
        args = [str(BIN / "velesio-router"), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(self.port),
                "--mesh-bind", self.mesh]
        self.router = Proc(args, self._path("router", ".log"),
                           env={"API_TOKENS": self.api_tokens, "VELESIO_LOOP": self.loop})
        self.wait_for(lambda h: True, 30)

    def start_workers(self, names: list[str], models: list[dict[str, Any]], wait: float = 120) -> None:
        for name in names:
            cfg = self._path(f"worker-{name}", ".yaml")
            cfg.write_text(yaml.safe_dump({"worker": {"models": models}}))
            args = [str(BIN / "velesio-worker"), "--router", self.mesh, "--config", str(cfg), "--name", name]
            self.workers[name] = Proc(args, self._path(f"worker-{name}", ".log"),
                                      env={"VELESIO_LOOP": self.loop, **self.worker_env})
        want = set(self.workers)
        self.wait_for(lambda h: want <= {w["id"] for w in h["workers"]}, wait)

    def stop_worker(self, name: str, kill: bool = False) -> None:
        self.workers.pop(name).stop(kill=kill)

    def health(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.loads(r.read())

    def wait_for(self, predicate, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.router is not None and not self.router.alive():
                break
            try:
                last = self.health()
                if predicate(last):
                    return last
            except OSError:
                pass
            time.sleep(0.1)
        logs = "\n".join(f"--- {n}\n{p.log_tail()}" for n, p in
                         [("router", self.router), *self.workers.items()] if p is not None)
        raise RuntimeError(f"the mesh never reached the expected state; last /health: {last}\n{logs}")

    def failovers(self) -> int | None:
        """Jobs the router moved to another worker so far (its /metrics), or None without metrics."""
        req = urllib.request.Request(self.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                text = r.read().decode()
        except OSError:
            return None
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("velesio_failovers_total")))

    def jobs_done(self) -> dict[str, int]:
        return {w["id"]: int(w["jobs_done"]) for w in self.health()["workers"]}

    def pids(self) -> dict[str, int]:
        out = {"router": self.router.pid} if self.router else {}
        out.update({f"worker:{n}": p.pid for n, p in self.workers.items()})
        return out

    def close(self) -> None:
        for name in list(self.workers):
            # Workers are killed: a drain would wait for jobs the benchmark no longer cares about.
            self.stop_worker(name, kill=True)
        if self.router is not None:
            self.router.stop()
            self.router = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CpuMeter:
    """CPU seconds used by a set of processes between start() and stop()."""

    def __init__(self, pids: dict[str, int]):
        self.pids = pids
        self.before: dict[str, float] = {}

    def start(self) -> None:
        self.before = {n: cpu_seconds(p) for n, p in self.pids.items()}

    def stop(self) -> dict[str, float]:
        out = {}
        for n, p in self.pids.items():
            try:
                out[n] = cpu_seconds(p) - self.before[n]
            except OSError:
                out[n] = float("nan")
        return out
