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
from velesio.plugins.discovery import discover

from .supervisor import BackendLimits, BackendProcess, Events, meminfo_mb

log = logging.getLogger("velesio.worker")


@dataclasses.dataclass
class LoadedModel:
    """A model this worker serves: its configuration and the backend process that runs its jobs."""

    config: ModelConfig
    process: BackendProcess
    kind: str
    busy: int = 0  # slots taken by running jobs (an exclusive job takes them all)

    @property
    def operations(self) -> list[str]:
        return self.process.operations

    @property
    def free(self) -> int:
        if self.process.state != "ready":
            return 0  # restarting after a crash: no job until it is back
        return max(0, self.config.slots - self.busy)

    def advert(self) -> dict[str, Any]:
        meta = {**self.process.meta, "max_job_s": self.process.limits.max_job_s}
        return {"name": self.config.name, "backend": self.config.backend, "kind": self.kind,
                "operations": self.operations, "slots": self.config.slots, "meta": meta}


def model_configs(entries: list[dict[str, Any]] | None, backends: dict[str, type[Backend]]) -> list[ModelConfig]:
    """The configured models, or every backend's embedded defaults when none are configured."""
    if entries is None:
        return [m for cls in backends.values() if cls.unavailable_reason() is None for m in cls.embedded_models()]
    configs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("backend"):
            raise ValueError(f"worker.models[{i}]: needs at least name and backend")
        unknown = set(entry) - {"name", "backend", "path", "slots", "options", *LIMIT_KEYS}
        if unknown:
            raise ValueError(f"worker.models[{i}]: unknown key(s) {', '.join(sorted(unknown))}")
        slots = entry.get("slots", 1)
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ValueError(f"worker.models[{i}].slots: a whole number >= 1, not {slots!r}")
        cfg = ModelConfig(name=str(entry["name"]), backend=str(entry["backend"]),
                          path=os.path.expanduser(str(entry["path"])) if entry.get("path") else None,
                          slots=slots, options=dict(entry.get("options") or {}))
        if cfg.path is None and cfg.backend in backends:
            # No path: the file the backend ships for a model of this name (the embedded defaults), if any.
            shipped = {m.name: m for m in backends[cfg.backend].embedded_models()}
            if cfg.name in shipped:
                cfg.path = shipped[cfg.name].path
                cfg.options = {**shipped[cfg.name].options, **cfg.options}
        configs.append(cfg)
    return configs


LIMIT_KEYS = ("max_job_s", "max_memory_mb")  # per model entry, enforced by the worker (worker/supervisor.py)


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


async def start_models(entries: list[dict[str, Any]] | None, events: Events, *, cancel_grace_s: float,
                       log_level: str = "INFO", log_json: bool = False,
                       threads: int | None = None) -> tuple[list[LoadedModel], list[dict[str, str]]]:
    """Discover backends, then start every model's backend process, in parallel. Returns (loaded, failures);
    a backend or model that fails is recorded with its reason and never takes the worker down. Raises
    ValueError for a configuration that is wrong."""
    failures: list[dict[str, str]] = []
    backends: dict[str, type[Backend]] = {}
    for found in discover():
        if found.error or found.backend is None:
            error = found.error or "the backend did not load"
            log.error("backend plugin %s (%s) not loaded: %s", found.name, found.dist, error)
            failures.append({"backend": found.name, "model": "", "reason": error})
        else:
            backends[found.name] = found.backend
    configs = model_configs(entries, backends)
    # One configured entry per config (model_configs keeps their order); none for the embedded defaults.
    limits = [model_limits(entries[i] if entries else None, f"worker.models[{i}]", cancel_grace_s)
              for i in range(len(configs))]
    loaded: list[LoadedModel] = []

    async def start_one(cfg: ModelConfig, lim: BackendLimits) -> None:
        cls = backends.get(cfg.backend)
        reason: str | None
        if cls is None:
            reason = f"no backend named '{cfg.backend}' is installed (known: {', '.join(sorted(backends)) or 'none'})"
        else:
            reason = cls.unavailable_reason()
        if reason or cls is None:
            log.error("model %s not loaded: %s", cfg.name, reason)
            failures.append({"backend": cfg.backend, "model": cfg.name, "reason": str(reason)})
            return
        started = time.perf_counter()
        size = ""
        if cfg.path and os.path.isfile(cfg.path):
            size = f", {os.path.getsize(cfg.path) / 1e6:.0f} MB"
        log.info("loading model %s (%s%s) from %s", cfg.name, cfg.backend, size, cfg.path or "embedded defaults")
        process = BackendProcess(cfg, cls, events, lim, log_level=log_level, log_json=log_json, threads=threads)
        reason = await process.start()
        if reason is not None:
            log.error("model %s (%s) failed to load: %s", cfg.name, cfg.backend, reason)
            failures.append({"backend": cfg.backend, "model": cfg.name, "reason": reason})
            await process.stop()
            return
        log.info("model %s ready in %.1fs (%s, %d slot(s), backend process %s)", cfg.name,
                 time.perf_counter() - started, ", ".join(process.operations), cfg.slots, process.pid)
        loaded.append(LoadedModel(cfg, process, cls.kind))

    await asyncio.gather(*(start_one(cfg, lim) for cfg, lim in zip(configs, limits, strict=True)))
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
