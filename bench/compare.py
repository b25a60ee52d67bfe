"""Compare runs of ``python -m bench``: ``python -m bench.compare LABEL=a.json,b.json LABEL2=c.json ...``.

Prints, per label, the median over its runs of the key numbers of the overhead and stream scenarios. Runs of
one label are meant to alternate with the others' (A B A B ...), so that a busy machine weighs on all alike.
CPU time per request or per token (from /proc) moves less with the machine's load than throughput does."""

from __future__ import annotations

import json
import statistics
import sys
from typing import Any


def _get(results: dict[str, Any], path: tuple) -> float | None:
    scenario, key, field = path
    rows = (results["scenarios"].get(scenario) or {}).get("rows") or []
    for row in rows:
        if row.get("concurrency") == key:
            value = row.get(field)
            return float(value) if isinstance(value, (int, float)) else None
    return None


METRICS = [
    ("req/s c=16", ("overhead", 16, "rps")),
    ("router µs/req c=16", ("overhead", 16, "router_cpu_us")),
    ("worker µs/req c=16", ("overhead", 16, "worker_cpu_us")),
    ("req/s c=64", ("overhead", 64, "rps")),
    ("router µs/req c=64", ("overhead", 64, "router_cpu_us")),
    ("tokens/s 1 stream", ("stream", 1, "tokens_per_s")),
    ("tokens/s 64 streams", ("stream", 64, "tokens_per_s")),
    ("router µs/token 64", ("stream", 64, "router_cpu_us_per_token")),
    ("worker µs/token 64", ("stream", 64, "worker_cpu_us_per_token")),
]


def main(argv: list[str]) -> int:
    groups: dict[str, list[dict[str, Any]]] = {}
    for arg in argv:
        label, _, files = arg.partition("=")
        groups[label] = [json.load(open(f)) for f in files.split(",") if f]
    head = ["metric"] + list(groups)
    print("| " + " | ".join(head) + " |")
    print("|---" + "|---:" * len(groups) + "|")
    for name, path in METRICS:
        cells = []
        for runs in groups.values():
            values = [v for v in (_get(r, path) for r in runs) if v is not None]
            cells.append(f"{statistics.median(values):,.1f}" if values else "–")
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
