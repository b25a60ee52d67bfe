"""Fixtures that start real ``velesio-router`` and ``velesio-worker`` processes on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

TOKEN = "test-token"
BIN = Path(sys.executable).parent
# The workers a test run starts share a host registry of their own (worker/cpu.py), so that their CPU
# shares do not depend on whatever else runs workers on this machine.
os.environ.setdefault("VELESIO_RUNTIME_DIR", tempfile.mkdtemp(prefix="velesio-workers-"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """A child process whose output goes to a log file the test can read."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.args = args
        self.log_path = log_path
        self.log_file = open(log_path, "ab")
        self.popen = subprocess.Popen(args, stdout=self.log_file, stderr=subprocess.STDOUT,
                                      env={**os.environ, **(env or {})}, start_new_session=True)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 5.0) -> str:
        """The log once it holds ``text`` (lines below WARNING reach it within a fraction of a second)."""
        deadline = time.monotonic() + timeout
        while text not in self.log and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.log

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 10) -> int | None:
        if self.alive():
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(5)
        self.log_file.close()
        return self.popen.returncode


def raw_post(router, path: str, data: bytes | None, headers: dict[str, str]) -> tuple[int, dict[str, str], list[bytes]]:
    """POST over a raw socket; returns the status, headers and the HTTP/1.1 chunks as the server framed them
    (what a cpp-httplib content receiver is called with)."""
    url = urllib.parse.urlsplit(router.url)
    head = {"Host": f"{url.hostname}:{url.port}", "Connection": "close", **headers}
    if data is not None:
        head["Content-Length"] = str(len(data))
    request = f"POST {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n"
    with socket.create_connection((url.hostname, url.port), timeout=120) as sock:
        sock.sendall(request.encode() + (data or b""))
        f = sock.makefile("rb")
        status = int(f.readline().split()[1])
        response_headers: dict[str, str] = {}
        while True:
            line = f.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            key, _, value = line.decode().partition(":")
            response_headers[key.strip().lower()] = value.strip()
        chunks: list[bytes] = []
        if response_headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int(f.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while f.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(f.read(size))
                assert f.readline() == b"\r\n"
        else:
            length = int(response_headers.get("content-length", "-1"))
            chunks.append(f.read(length) if length >= 0 else f.read())
    return status, response_headers, chunks


class FakeRouter:
    """A bare ROUTER socket on loopback that a real worker can be started against (``start_worker``)."""

    def __init__(self, timeout_ms: int = 30000):
        import zmq

        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, timeout_ms)
        self.mesh = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"

    def close(self) -> None:
        self.sock.close()


def sse_events(response: requests.Response) -> list[str]:
    """The ``data:`` payloads of an SSE response, asserting that every non-empty line is one."""
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if line:
            assert line.startswith("data: "), line
            events.append(line[len("data: "):])
    return events


class Router:
    def __init__(self, proc: Proc, port: int, mesh: str, token: str):
        self.proc, self.port, self.mesh, self.token = proc, port, mesh, token
        self.url = f"http://127.0.0.1:{port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def get(self, path: str, **kw: Any) -> requests.Response:
        return requests.get(self.url + path, headers={**self.headers, **kw.pop("headers", {})}, timeout=60, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> requests.Response:
        return requests.post(self.url + path, json=json, headers={**self.headers, **kw.pop("headers", {})},
                             timeout=kw.pop("timeout", 120), **kw)

    def health(self) -> dict[str, Any]:
        return requests.get(self.url + "/health", timeout=10).json()

    def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                last = self.health()
                if predicate(last):
                    return last
            except requests.RequestException:
                pass
            time.sleep(0.1)
        raise AssertionError(f"router never reached the expected state; last /health: {last}\n{self.proc.log[-3000:]}")

    def wait_workers(self, names: set[str], timeout: float = 90) -> dict[str, Any]:
        return self.wait_for(lambda h: names <= {w["id"] for w in h["workers"]}, timeout)


@pytest.fixture(scope="session")
def logs_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="session")
def spawn(logs_dir: Path) -> Iterator[Callable[..., Proc]]:
    procs: list[Proc] = []

    def _spawn(args: list[str], name: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(args, logs_dir / f"{name}-{len(procs)}.log", env)
        procs.append(proc)
        return proc

    yield _spawn
    for proc in procs:
        proc.stop(5)


def write_config(path: Path, data: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


@pytest.fixture(scope="session")
def start_router(spawn, tmp_path_factory) -> Callable[..., Router]:
    def _start(router_cfg: dict[str, Any] | None = None, token: str = TOKEN, port: int | None = None,
               mesh_port: int | None = None, extra_args: list[str] | None = None) -> Router:
        port = port or free_port()
        mesh = f"tcp://127.0.0.1:{mesh_port or free_port()}"
        cfg = {"router": {"rate_limit": {"requests_per_minute": 100000, "concurrent": 1000}, **(router_cfg or {})}}
        path = write_config(tmp_path_factory.mktemp("router") / "mesh.yaml", cfg)
        proc = spawn([str(BIN / "velesio-router"), "--config", path, "--host", "127.0.0.1", "--port", str(port),
                      "--mesh-bind", mesh, *(extra_args or [])], "router",
                     env={"API_TOKENS": token} if token else None)
        router = Router(proc, port, mesh, token)
        router.wait_for(lambda h: True, timeout=30)
        return router

    return _start


@pytest.fixture(scope="session")
def start_worker(spawn, tmp_path_factory) -> Callable[..., Proc]:
    def _start(router: Router, name: str, models: list[dict[str, Any]] | None = None, wait: bool = True,
               worker_cfg: dict[str, Any] | None = None, env: dict[str, str] | None = None,
               more_routers: list[Router] = (), args: list[str] = ()) -> Proc:
        cfg = {"worker": {"models": models, **(worker_cfg or {})}}
        path = write_config(tmp_path_factory.mktemp("worker") / "mesh.yaml", cfg)
        routers = [arg for r in (router, *more_routers) for arg in ("--router", r.mesh)]
        proc = spawn([str(BIN / "velesio-worker"), *routers, "--config", path, "--name", name, *args],
                     f"worker-{name}", env=env)
        if wait:
            router.wait_workers({name})
        return proc

    return _start


SMOLLM2 = {"name": "smollm2-135m-instruct", "backend": "llama-cpp", "slots": 1,
           "options": {"n_ctx": 2048, "n_threads": 1}}


@pytest.fixture(scope="session")
def mesh(start_router, start_worker) -> Router:
    """One router and one text worker on the embedded SmolLM2, shared by the read-only tests."""
    router = start_router()
    start_worker(router, "text-1", [SMOLLM2])
    return router
