"""``python -m bench``: start real router and worker processes on loopback, run the scenarios, print a table
and write ``bench/results/latest.json`` (and ``latest.md``). See docs/performance.md."""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from velesio import loop as event_loop

from . import machine, report
from .scenarios import SCENARIOS, Settings


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _names(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("scenarios", nargs="*", metavar="SCENARIO",
                   help=f"scenarios to run, of {', '.join(SCENARIOS)} (default: all)")
    p.add_argument("--quick", action="store_true", help="a short smoke run (about three minutes)")
    p.add_argument("--duration", type=float, help="seconds measured per point (default 3, quick 1.5)")
    p.add_argument("--concurrency", type=_ints, help="router overhead concurrencies (default 1,16,64,256)")
    p.add_argument("--rounds", type=int, help="router overhead: measurements per point, medians reported "
                                              "(default 3, quick 1)")
    p.add_argument("--stream-tokens", type=int, help="tokens per stream in the relay scenario (default 1000)")
    p.add_argument("--streams", type=_ints, help="concurrent streams in the relay scenario (default 1,64)")
    p.add_argument("--workers", type=_ints, help="worker counts for scaling (default 1,2,4,8)")
    p.add_argument("--idle-streams", type=int, help="open streams for the memory scenario (default 1000)")
    p.add_argument("--e2e-reps", type=int, help="rounds of the end-to-end scenario (default 12)")
    p.add_argument("--e2e-threads", type=int, help="llama.cpp threads in the end-to-end scenario (default 2)")
    p.add_argument("--two-requests", type=int, help="two workers per host: requests per reply length, shared by "
                                                    "the clients (default 32, quick 16)")
    p.add_argument("--two-clients", type=int, help="two workers per host: concurrent clients (default 16)")
    p.add_argument("--two-deadline", type=float, help="two workers per host: seconds a loaded phase may last; "
                                                      "requests still open then are unanswered (default 45)")
    p.add_argument("--routing-conversations", type=int, help="affinity: conversations at once (default 32)")
    p.add_argument("--routing-rounds", type=int, help="affinity: rounds per routing mode (default 2)")
    p.add_argument("--routing-slots", type=int, help="affinity: slots per worker (default 4)")
    p.add_argument("--routing-cache-sequences", type=int,
                   help="affinity: cached sequences per worker beyond its slots (default 8)")
    p.add_argument("--two-threads", type=int, help="two workers per host: give (b)'s models this many threads "
                                                   "through options.n_threads instead of the worker's share")
    p.add_argument("--server-concurrency", type=_ints,
                   help="side by side with llama-server: concurrent clients (default 1,4,8,16; quick 1,4)")
    p.add_argument("--server-systems", type=_names,
                   help="side by side with llama-server: the systems, of llama-server, batched (the mesh on its "
                        "batching engine), contexts (the mesh on separate contexts) (default: all three)")
    p.add_argument("--server-tokens", type=int, help="side by side with llama-server: n_predict (default 64)")
    p.add_argument("--server-duration", type=float,
                   help="side by side with llama-server: seconds measured per run (default 12, quick 4)")
    p.add_argument("--server-rounds", type=int, help="side by side with llama-server: rounds (default 3, quick 1)")
    p.add_argument("--server-threads", type=int, help="side by side with llama-server: llama.cpp threads (default 2)")
    p.add_argument("--server-quiet-wait", type=float,
                   help="side by side with llama-server: before each run, wait up to this many seconds for other "
                        "processes to leave the CPU (default 120, quick 10)")
    p.add_argument("--choices-n", type=int, help="several completions of one prompt: n_cmpl (default 4)")
    p.add_argument("--choices-prompt-tokens", type=int,
                   help="several completions of one prompt: the prompt's length in tokens (default 900)")
    p.add_argument("--choices-tokens", type=int, help="several completions of one prompt: n_predict (default 32)")
    p.add_argument("--llama-server", help="side by side with llama-server: its binary (default: $LLAMA_SERVER, then "
                                          "what `make llama-server` built, then PATH)")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default=event_loop.name(),
                   help="event loop of the router and workers (default: uvloop when installed, as they run "
                        "by default; asyncio sets VELESIO_LOOP=asyncio for them)")
    p.add_argument("--client", choices=("wrk", "python"), default="wrk",
                   help="load generator of the overhead scenario (wrk when installed: apt-get install wrk)")
    p.add_argument("--no-floor", action="store_true",
                   help="skip the two floors (bare aiohttp; with a ZeroMQ echo hop) in the overhead scenario")
    p.add_argument("--profile", action="store_true",
                   help="sample the router with py-spy during overhead and stream (bench/results/profile-*.txt)")
    p.add_argument("--output", type=Path, help="JSON results (default bench/results/latest.json)")
    p.add_argument("--logs", type=Path, help="keep the processes' configs and logs in this folder")
    args = p.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return args


def settings_from(args: argparse.Namespace) -> Settings:
    s = Settings.quick(loop=args.loop) if args.quick else Settings(loop=args.loop)
    for arg, field in (("duration", "duration"), ("concurrency", "concurrencies"), ("rounds", "rounds"),
                       ("stream_tokens", "stream_tokens"),
                       ("streams", "stream_concurrencies"), ("workers", "scaling_workers"),
                       ("idle_streams", "idle_streams"), ("e2e_reps", "e2e_reps"),
                       ("e2e_threads", "e2e_threads"), ("two_requests", "two_requests"),
                       ("two_clients", "two_clients"), ("two_deadline", "two_deadline_s"),
                       ("two_threads", "two_threads"), ("server_concurrency", "server_concurrencies"),
                       ("server_systems", "server_systems"), ("server_tokens", "server_tokens"),
                       ("server_duration", "server_duration"), ("server_rounds", "server_rounds"),
                       ("server_threads", "server_threads"), ("server_quiet_wait", "server_quiet_wait"),
                       ("llama_server", "llama_server"), ("routing_conversations", "routing_conversations"),
                       ("routing_rounds", "routing_rounds"), ("routing_slots", "routing_slots"),
                       ("routing_cache_sequences", "routing_cache_sequences"), ("choices_n", "choices_n"),
                       ("choices_prompt_tokens", "choices_prompt_tokens"), ("choices_tokens", "choices_tokens")):
        if getattr(args, arg) is not None:
            setattr(s, field, getattr(args, arg))
    s.floor = not args.no_floor
    s.profile = args.profile
    s.client = args.client
    return s


def _clean(obj: Any) -> Any:
    """JSON has no NaN: write null."""
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s = settings_from(args)
    names = args.scenarios or list(SCENARIOS)
    out_path = args.output or s.results / "latest.json"
    s.results.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, flush=True)

    info = machine.describe()
    log(f"machine: {machine.summary_line(info)}")
    if (info["cores_usable"] or 1) <= 2:
        log("note: client, router and worker share these cores; the numbers include that contention.")
    results: dict[str, Any] = {
        "command": "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
        "machine": info,
        "settings": {"mode": "quick" if args.quick else "full", "loop": s.loop, "scenarios": names,
                     **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(s).items()}},
        "targets": report.TARGETS,
        "scenarios": {},
        "errors": {},
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="velesio-bench-") as tmp:
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            tmp = str(args.logs)
        for name in names:
            log(f"\n== {name}")
            t0 = time.monotonic()
            workdir = Path(tmp) / name
            workdir.mkdir(exist_ok=True)
            try:
                results["scenarios"][name] = SCENARIOS[name](s, workdir, log)
            except Exception as exc:  # one failing scenario must not lose the others
                log(f"  FAILED: {type(exc).__name__}: {exc}")
                results["errors"][name] = traceback.format_exc()[-4000:]
            log(f"  ({time.monotonic() - t0:.0f} s)")
    results["elapsed_s"] = time.monotonic() - started
    info["loadavg_end"] = machine.loadavg()
    table = report.markdown(results)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(_clean(results), indent=1) + "\n")
    out_path.with_suffix(".md").write_text(table)
    log("\n" + table)
    log(f"results: {out_path} and {out_path.with_suffix('.md')}")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
