"""The models a worker serves: backends found through entry points, one backend process per model."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
import time
from typing import Any

from velesio.backends import Backend, ModelConfig
from velesio.mesh import messages
from velesio.plugins.discovery import discover

from . import memory
from .supervisor import BackendLimits, BackendProcess, Events, RunningJob, meminfo_mb

log = logging.getLogger("velesio.worker")


@dataclasses.dataclass
class LoadedModel:
    """A model this worker serves: its configuration and the backend process that runs its jobs.

    ``phase`` is the model's life at run time (worker/admin.py): ``serving``; ``sleeping`` (idle past its
    ``keep_alive``: no process, woken by the next job); ``waking`` (its process loads for the jobs waiting in
    ``pending``); ``draining`` (being unloaded: no new job, those in flight finish)."""

    config: ModelConfig
    process: BackendProcess
    kind: str
    busy: int = 0  # slots taken by running jobs (an exclusive job takes them all), pending ones included
    backend_cls: type[Backend] | None = None  # what a new process of this model runs (a wake, a slot change)
    limits: BackendLimits = dataclasses.field(default_factory=BackendLimits)
    keep_alive_s: float | None = None  # idle this long: the process is stopped (None: never)
    size_mb: int | None = None  # the memory it takes by its estimate (worker/memory.py); None: unknown
    phase: str = "serving"
    last_used: float = dataclasses.field(default_factory=time.monotonic)
    # Jobs accepted while the model sleeps, each with its REQUEST body: they run once it is awake.
    pending: list[tuple[RunningJob, dict[str, Any]]] = dataclasses.field(default_factory=list)
    # Processes replaced by a new one (more slots) that still finish the jobs they hold.
    retired: list[BackendProcess] = dataclasses.field(default_factory=list)
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)  # one life-cycle change at a time

    @property
    def operations(self) -> list[str]:
        return self.process.operations

    @property
    def free(self) -> int:
        if self.phase == "draining":
            return 0
        if self.phase == "serving" and self.process.state != "ready":
            return 0  # restarting after a crash: no job until it is back
        return max(0, self.config.slots - self.busy)

    @property
    def state(self) -> str:
        """What ``backends`` says of it: the process's state, or the phase when that says more."""
        if self.phase == "serving":
            return self.process.state
        return {"waking": "loading"}.get(self.phase, self.phase)

    def status(self, now: float | None = None) -> messages.BackendStatus:
        status = self.process.status()
        status["state"] = self.state
        if self.phase in ("sleeping", "waking"):
            status["pid"], status["memory_mb"] = None, None
        status["size_mb"] = self.size_mb
        status["keep_alive_s"] = self.keep_alive_s
        idle = 0.0 if self.busy else (now if now is not None else time.monotonic()) - self.last_used
        status["idle_s"] = round(idle, 1)
        return status

    def advert(self) -> dict[str, Any]:
        meta = {**self.process.meta, "max_job_s": self.process.limits.max_job_s}
        return {"name": self.config.name, "backend": self.config.backend, "kind": self.kind,
                "operations": self.operations, "slots": self.config.slots, "meta": meta}


LIMIT_KEYS = ("max_job_s", "max_memory_mb")  # per model entry, enforced by the worker (worker/supervisor.py)
RUN_TIME_KEYS = ("keep_alive", "size_mb")  # per model entry: idle unload, and the memory estimate's override
MODEL_KEYS = frozenset({"name", "backend", "path", "embedded", "slots", "options", *LIMIT_KEYS, *RUN_TIME_KEYS})


def model_config(entry: Any, where: str, backends: dict[str, type[Backend]]) -> ModelConfig:
    """One model entry (mesh.yaml's ``worker.models[i]``, or an operator's LOAD), checked. Raises ValueError."""
    if not isinstance(entry, dict) or not entry.get("name") or not entry.get("backend"):
        raise ValueError(f"{where}: needs at least name and backend")
    unknown = set(entry) - MODEL_KEYS
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    slots = entry.get("slots", 1)
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise ValueError(f"{where}.slots: a whole number >= 1, not {slots!r}")
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise ValueError(f"{where}.options: a mapping, not {options!r}")
    if entry.get("path") and entry.get("embedded"):
        raise ValueError(f"{where}: path or embedded, not both")
    cfg = ModelConfig(name=str(entry["name"]), backend=str(entry["backend"]),
                      path=os.path.expanduser(str(entry["path"])) if entry.get("path") else None,
                      slots=slots, options=dict(options))
    if cfg.path is None and cfg.backend in backends:
        # No path: the files the backend ships (the embedded defaults, e.g. in a package) for a model of this
        # name, or of the name ``embedded`` gives (the same files served under another name).
        shipped = {m.name: m for m in backends[cfg.backend].embedded_models()}
        source = str(entry.get("embedded") or cfg.name)
        if source in shipped:
            cfg.path = shipped[source].path
            cfg.options = {**shipped[source].options, **cfg.options}
        elif entry.get("embedded"):
            raise ValueError(f"{where}.embedded: backend {cfg.backend} ships no model named {source!r} "
                             f"(it ships: {', '.join(sorted(shipped)) or 'none'})")
    return cfg


def model_configs(entries: list[dict[str, Any]] | None, backends: dict[str, type[Backend]]) -> list[ModelConfig]:
    """The configured models, or every backend's embedded defaults when none are configured."""
    if entries is None:
        return [m for cls in backends.values() if cls.unavailable_reason() is None for m in cls.embedded_models()]
    return [model_config(entry, f"worker.models[{i}]", backends) for i, entry in enumerate(entries)]


def model_limits(entry: dict[str, Any] | None, where: str, cancel_grace_s: float) -> BackendLimits:
    """A model entry's ``max_job_s`` and ``max_memory_mb``, checked; the defaults for what it leaves out."""
    values: dict[str, Any] = {"cancel_grace_s": cancel_grace_s}
    for key in LIMIT_KEYS:
        value = (entry or {}).get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{where}.{key}: a number > 0, not {value!r}")
        values[key] = int(value) if key == "max_memory_mb" else float(value)
    return BackendLimits(**values)


def keep_alive_of(value: Any, where: str) -> float | None:
    """``keep_alive``: seconds > 0 a model may stay idle before its process is stopped; None: for ever."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{where}.keep_alive: a number of seconds > 0 (or null: never unload), not {value!r}")
    return float(value)


def size_of(entry: dict[str, Any] | None, cfg: ModelConfig, where: str) -> int | None:
    """The model's memory estimate: ``size_mb`` when the entry gives one (0: do not check), else its files'."""
    value = (entry or {}).get("size_mb")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        raise ValueError(f"{where}.size_mb: a number of MB >= 0, not {value!r}")
    return memory.estimate_mb(cfg.path, None if value is None else int(value))


def discover_backends() -> tuple[dict[str, type[Backend]], list[dict[str, str]]]:
    """The installed backends by name, and the plugins that failed to load."""
    failures: list[dict[str, str]] = []
    backends: dict[str, type[Backend]] = {}
    for found in discover():
        if found.error or found.backend is None:
            error = found.error or "the backend did not load"
            log.error("backend plugin %s (%s) not loaded: %s", found.name, found.dist, error)
            failures.append({"backend": found.name, "model": "", "reason": error})
        else:
            backends[found.name] = found.backend
    return backends, failures


def unavailable(cfg: ModelConfig, backends: dict[str, type[Backend]]) -> str | None:
    """Why no backend of this worker can serve ``cfg`` (None: one can)."""
    cls = backends.get(cfg.backend)
    if cls is None:
        return f"no backend named '{cfg.backend}' is installed (known: {', '.join(sorted(backends)) or 'none'})"
    return cls.unavailable_reason()


async def start_process(process: BackendProcess) -> str | None:
    """Start a model's backend process and load the model; None when ready, else why not (then it is stopped)."""
    cfg = process.config
    started = time.perf_counter()
    size = ""
    if cfg.path and os.path.isfile(cfg.path):
        size = f", {os.path.getsize(cfg.path) / 1e6:.0f} MB"
    log.info("loading model %s (%s%s) from %s", cfg.name, cfg.backend, size, cfg.path or "embedded defaults")
    reason = await process.start()
    if reason is not None:
        log.error("model %s (%s) failed to load: %s", cfg.name, cfg.backend, reason)
        await process.stop()
        return reason
    log.info("model %s ready in %.1fs (%s, %d slot(s), backend process %s)", cfg.name,
             time.perf_counter() - started, ", ".join(process.operations), cfg.slots, process.pid)
    return None


async def start_models(entries: list[dict[str, Any]] | None, events: Events, *, cancel_grace_s: float,
                       log_level: str = "INFO", log_json: bool = False, threads: int | None = None,
                       budget_mb: int | None = None, backends: dict[str, type[Backend]] | None = None,
                       ) -> tuple[list[LoadedModel], list[dict[str, str]]]:
    """Discover backends (unless given), then start every model's backend process, in parallel. Returns
    (loaded, failures); a backend or model that fails, or does not fit in memory, is recorded with its reason
    and never takes the worker down. Raises ValueError for a configuration that is wrong."""
    failures: list[dict[str, str]] = []
    if backends is None:
        backends, failures = discover_backends()
    configs = model_configs(entries, backends)
    # One configured entry per config (model_configs keeps their order); none for the embedded defaults.
    where = [f"worker.models[{i}]" for i in range(len(configs))]
    limits = [model_limits(entries[i] if entries else None, where[i], cancel_grace_s) for i in range(len(configs))]
    keep = [keep_alive_of((entries[i] if entries else {}).get("keep_alive"), where[i]) for i in range(len(configs))]
    sizes = [size_of(entries[i] if entries else None, cfg, where[i]) for i, cfg in enumerate(configs)]
    loaded: list[LoadedModel] = []
    # The models load together: each must fit beside those before it in the list (their estimates).
    free, committed = memory.free_mb(device_info()), 0
    fits = []
    for cfg, need in zip(configs, sizes, strict=True):
        why = memory.refusal(cfg.name, need, free=None if free is None else free - committed, budget_mb=budget_mb,
                             committed_mb=committed)
        fits.append(why)
        if why is None:
            committed += need or 0

    async def start_one(i: int) -> None:
        cfg = configs[i]
        reason = unavailable(cfg, backends) or fits[i]
        cls = backends.get(cfg.backend)
        if reason or cls is None:
            log.error("model %s not loaded: %s", cfg.name, reason)
            failures.append({"backend": cfg.backend, "model": cfg.name, "reason": str(reason)})
            return
        process = BackendProcess(cfg, cls, events, limits[i], log_level=log_level, log_json=log_json, threads=threads)
        reason = await start_process(process)
        if reason is not None:
            failures.append({"backend": cfg.backend, "model": cfg.name, "reason": reason})
            return
        loaded.append(LoadedModel(cfg, process, cls.kind, backend_cls=cls, limits=limits[i], keep_alive_s=keep[i],
                                  size_mb=sizes[i]))

    await asyncio.gather(*(start_one(i) for i in range(len(configs))))
    loaded.sort(key=lambda m: m.config.name)
    return loaded, failures


def device_info() -> dict[str, Any]:
    """What the worker advertises about its host: device and memory (GPU memory when torch sees a GPU)."""
    info: dict[str, Any] = {"device": "cpu"}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        info.update(device=f"cuda:0 {torch.cuda.get_device_name(0)}", memory_total_mb=total // 2**20,
                    memory_free_mb=free // 2**20)
        return info
    mem = meminfo_mb()
    if "MemTotal" in mem and "MemAvailable" in mem:
        info.update(memory_total_mb=mem["MemTotal"], memory_free_mb=mem["MemAvailable"])
    return info
