"""wrk (https://github.com/wg/wrk, Debian package ``wrk``) as the load generator for requests: closed loop, or paced.

A Python client costs about 300 µs of CPU per request, more than the router it measures, and on two
cores that CPU is taken from the router and the worker. wrk, written in C, needs a few µs per request,
so what is measured is the mesh. It is used when it is on PATH; otherwise the benchmark falls back to
bench/loadgen.py and says so.

wrk reports latency percentiles from its own histogram (1 µs resolution), not raw samples."""

from __future__ import annotations

import json
import re
import resource
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

# Lua for wrk: a POST with the given headers and body; at the end one JSON line with the counts and
# percentiles (wrk's ``done`` hook). Non-2xx answers and socket errors are counted, never retried.
SCRIPT = """
wrk.method = "POST"
wrk.body = %(body)s
%(headers)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "non2xx": %%d, "connect": %%d, "read": %%d, ' ..
    '"write": %%d, "timeout": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d, ' ..
    '"mean_us": %%.1f}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


def available() -> str | None:
    return shutil.which("wrk")


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal for ASCII text


# Paced runs: each connection waits a random 0 to 2 × think ms (mean: think) before its next request, so
# that arrivals spread out instead of moving in step (wrk's ``delay`` hook; latency excludes the wait).
THINK = """
delay = function() return math.random(0, %(twice)d) end
"""


def lua_script(headers: dict[str, str], body: dict[str, Any], think_ms: float = 0) -> str:
    lines = "\n".join(f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in headers.items())
    script = SCRIPT % {"body": _lua_string(json.dumps(body)), "headers": lines}
    if think_ms > 0:
        script += THINK % {"twice": max(1, round(2 * think_ms))}
    return script


def run(url: str, headers: dict[str, str], body: dict[str, Any], *, concurrency: int, duration_s: float,
        threads: int = 1, think_ms: float = 0) -> dict[str, Any]:
    """One run of ``concurrency`` connections, closed loop (``think_ms`` 0) or paced; its counts, percentiles
    and wrk's CPU time."""
    exe = available()
    if exe is None:
        raise RuntimeError("wrk is not installed (apt-get install wrk)")
    script = lua_script(headers, body, think_ms)
    threads = max(1, min(threads, concurrency))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "post.lua"
        path.write_text(script)
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run([exe, "-t", str(threads), "-c", str(concurrency), "-d", f"{max(1, round(duration_s))}s",
                              "--timeout", "30s", "-s", str(path), url], capture_output=True, text=True,
                             timeout=duration_s + 60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    match = re.search(r"^WRKJSON (\{.*\})$", out.stdout, re.M)
    if out.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-1500:]} {out.stderr[-1500:]}")
    res = json.loads(match.group(1))
    errors = res["non2xx"] + res["connect"] + res["read"] + res["write"] + res["timeout"]
    return {"completed": res["requests"], "completed_all": res["requests"], "window_s": res["duration_us"] / 1e6,
            "errors": errors, "error_sample": [f"{k} {res[k]}" for k in ("non2xx", "connect", "read", "write",
                                                                          "timeout") if res[k]],
            "p50_ms": res["p50_us"] / 1e3, "p90_ms": res["p90_us"] / 1e3, "p99_ms": res["p99_us"] / 1e3,
            "max_ms": res["max_us"] / 1e3,
            "cpu_s": after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime}
