"""Whether a model fits: its size estimated from its files, against the memory free on the host (or in the
worker's cgroup, or on its GPU when the worker knows that) and the worker's own ``memory_budget_mb``.

The estimate is the size of the model's files (a GGUF file, a diffusers folder) plus a tenth for what
loading adds (contexts, buffers), or the model entry's ``size_mb`` when the operator knows better; a model
with neither (a backend's built-in model with no files) is not checked. It is a lower bound on purpose: a
model refused by it would not have fitted, while one it lets through may still need more, which the backend
process's memory ceiling (``max_memory_mb``) catches without harming the worker."""

from __future__ import annotations

import math
import os
from typing import Any

from .supervisor import meminfo_mb

OVERHEAD = 0.10  # what loading adds to the files' size, as a share of it

CGROUP_MAX = "/sys/fs/cgroup/memory.max"
CGROUP_CURRENT = "/sys/fs/cgroup/memory.current"


def files_mb(path: str | None) -> float | None:
    """The size of a model file, or of every file under a model folder, in MB; None when there is none."""
    if not path:
        return None
    try:
        if os.path.isfile(path):
            return os.path.getsize(path) / 2**20
        if not os.path.isdir(path):
            return None
        total = 0
        for folder, _dirs, names in os.walk(path):
            for name in names:
                try:
                    total += os.path.getsize(os.path.join(folder, name))  # follows links (a Hugging Face cache)
                except OSError:
                    continue
        return total / 2**20
    except OSError:
        return None


def estimate_mb(path: str | None, size_mb: int | None = None) -> int | None:
    """The memory a model takes once loaded: ``size_mb`` when given, else its files plus ``OVERHEAD``."""
    if size_mb is not None:
        return int(size_mb)
    size = files_mb(path)
    return None if size is None else math.ceil(size * (1 + OVERHEAD))


def cgroup_room_mb(max_path: str = CGROUP_MAX, current_path: str = CGROUP_CURRENT) -> int | None:
    """What this process's cgroup (a container's memory limit) still allows, in MB; None without a limit."""
    try:
        with open(max_path) as f:
            raw = f.read().strip()
        if not raw.isdigit():
            return None  # "max": no limit
        with open(current_path) as f:
            current = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return max(0, int(raw) - current) // 2**20


def free_mb(device: dict[str, Any] | None = None) -> int | None:
    """The memory free for a new model, in MB: the host's MemAvailable, less when the cgroup allows less, and
    less again when ``device`` (worker/models.py ``device_info``) is a GPU whose free memory is known."""
    figures = [meminfo_mb().get("MemAvailable"), cgroup_room_mb()]
    if device and str(device.get("device", "")).startswith("cuda"):
        figures.append(device.get("memory_free_mb"))
    known = [int(x) for x in figures if isinstance(x, (int, float)) and not isinstance(x, bool)]
    return min(known) if known else None


def refusal(model: str, need_mb: int | None, *, free: int | None, budget_mb: int | None,
            committed_mb: int) -> str | None:
    """Why a model that needs ``need_mb`` must not be loaded (None: it fits). ``committed_mb``: what the
    worker's other models take by their estimates, counted against ``budget_mb``."""
    if not need_mb:
        return None
    if budget_mb is not None and committed_mb + need_mb > budget_mb:
        return (f"model {model} needs about {need_mb} MB, and this worker's models already take {committed_mb} MB "
                f"of its memory_budget_mb of {budget_mb} MB")
    if free is not None and need_mb > free:
        return f"model {model} needs about {need_mb} MB, but only {free} MB of memory are free"
    return None
