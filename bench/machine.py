"""What the numbers were measured on: CPU, cores, load, Python and the versions that matter."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from typing import Any

PACKAGES = ("velesio", "aiohttp", "pyzmq", "msgpack", "llama_cpp_python", "uvloop", "orjson")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_commit() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def describe() -> dict[str, Any]:
    import zmq

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "libzmq": zmq.zmq_version(),
        "versions": {p: version(p) for p in PACKAGES},
        "commit": git_commit(),
        "loadavg_start": loadavg(),
    }


def summary_line(m: dict[str, Any]) -> str:
    v = m["versions"]
    extras = ", ".join(f"{p} {v[p]}" for p in ("uvloop", "orjson") if v.get(p)) or "no uvloop/orjson"
    return (f"{m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), {m['memory_gb']} GB; {m['os']}; "
            f"{m['python']}; velesio {v['velesio']} ({m['commit']}), aiohttp {v['aiohttp']}, "
            f"pyzmq {v['pyzmq']} (libzmq {m['libzmq']}), msgpack {v['msgpack']}, "
            f"llama-cpp-python {v['llama_cpp_python']}; {extras}; load average at start "
            f"{' '.join(map(str, m['loadavg_start']))}")
