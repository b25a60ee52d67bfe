"""Loading the models a worker serves: backends found through entry points, one instance per model.
A backend or model that fails is recorded with its reason and fix; it never takes the worker down."""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Any

from velesio.backends import Backend, ModelConfig
from velesio.plugins.discovery import discover

log = logging.getLogger("velesio.worker")


@dataclasses.dataclass
class LoadedModel:
    config: ModelConfig
    backend: Backend
    meta: dict[str, Any]
    operations: list[str]
    kind: str
    busy: int = 0

    @property
    def free(self) -> int:
        return max(0, self.config.slots - self.busy)

    def advert(self) -> dict[str, Any]:
        meta = {k: v for k, v in self.meta.items() if k != "operations"}
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
        unknown = set(entry) - {"name", "backend", "path", "slots", "options"}
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


def load_models(entries: list[dict[str, Any]] | None) -> tuple[list[LoadedModel], list[dict[str, str]]]:
    """Discover backends, then load every model, in parallel threads. Returns (loaded, failures)."""
    failures: list[dict[str, str]] = []
    backends: dict[str, type[Backend]] = {}
    for found in discover():
        if found.error:
            log.error("backend plugin %s (%s) not loaded: %s", found.name, found.dist, found.error)
            failures.append({"backend": found.name, "model": "", "reason": found.error})
        else:
            backends[found.name] = found.backend
    configs = model_configs(entries, backends)
    loaded: list[LoadedModel] = []
    lock = threading.Lock()

    def load_one(cfg: ModelConfig) -> None:
        cls = backends.get(cfg.backend)
        if cls is None:
            reason = f"no backend named '{cfg.backend}' is installed (known: {', '.join(sorted(backends)) or 'none'})"
        else:
            reason = cls.unavailable_reason()
        if reason:
            log.error("model %s not loaded: %s", cfg.name, reason)
            with lock:
                failures.append({"backend": cfg.backend, "model": cfg.name, "reason": reason})
            return
        started = time.perf_counter()
        size = ""
        if cfg.path and os.path.exists(cfg.path) and os.path.isfile(cfg.path):
            size = f", {os.path.getsize(cfg.path) / 1e6:.0f} MB"
        log.info("loading model %s (%s%s) from %s", cfg.name, cfg.backend, size, cfg.path or "embedded defaults")
        try:
            backend = cls(cfg)
            meta = backend.load() or {}
        except Exception as exc:  # a model that fails to load must not take the worker down
            log.error("model %s (%s) failed to load: %s: %s", cfg.name, cfg.backend, type(exc).__name__, exc)
            with lock:
                failures.append({"backend": cfg.backend, "model": cfg.name, "reason": f"{type(exc).__name__}: {exc}"})
            return
        ops = [op for op in (meta.get("operations") or cls.operations)]
        model = LoadedModel(cfg, backend, meta, ops, cls.kind)
        log.info("model %s ready in %.1fs (%s, %d slot(s))", cfg.name, time.perf_counter() - started,
                 ", ".join(ops), cfg.slots)
        with lock:
            loaded.append(model)

    threads = [threading.Thread(target=load_one, args=(cfg,), name=f"load-{cfg.name}") for cfg in configs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
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
    try:
        with open("/proc/meminfo") as f:
            mem = {line.split(":")[0]: int(line.split()[1]) for line in f if len(line.split()) >= 2}
        info.update(memory_total_mb=mem["MemTotal"] // 1024, memory_free_mb=mem["MemAvailable"] // 1024)
    except (OSError, KeyError, ValueError):
        pass
    return info
