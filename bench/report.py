"""The results as Markdown tables (printed, written next to the JSON, and copied into docs/performance.md)."""

from __future__ import annotations

import math
from typing import Any

from .machine import summary_line
from .twoworkers import SHORT as TWO_WORKER_SYSTEMS
from .twoworkers import checks as two_worker_checks

# The targets for a 2-core machine.
TARGETS = {
    "overhead_rps_c16": 5000,
    "overhead_added_p50_ms_c16": 1.0,
    "overhead_added_p99_ms_c16": 5.0,
    "stream_tokens_per_s": 25000,
    "e2e_ratio": 0.97,
    "scaling_efficiency": 0.9,
    "idle_rss_mb": 150,
    "two_workers_rps_ratio": 1.0,  # (b) two workers on one host ÷ (a) one worker
    "two_workers_max_over_idle": 10,  # (b)'s slowest request ÷ its idle latency
    "affinity_ttft_ratio": 0.5,  # cache-aware turn-2+ TTFT p50 ÷ least-loaded's
    "affinity_throughput_ratio": 1.0,  # cache-aware tokens/s ÷ least-loaded's
    "fairness_b_over_idle": 2.0,  # B's p50 latency under A's flood ÷ idle (within one job time of idle)
    "prefix_second_turn_ratio": 0.3,  # a second turn's TTFT ÷ the cold first turn's (1,000-token prefix)
    "server_ratio": 0.9,  # the mesh's batched engine: aggregate tokens/s ÷ llama-server's, at every C
}


def _f(x: Any, digits: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, (int, float)):
        return f"{x:,.{digits}f}"
    return str(x)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def checks(results: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(what, target, measured, met) for every target whose scenario ran."""
    sc = results["scenarios"]
    out = []
    over = sc.get("overhead") or {}
    row16 = next((r for r in over.get("rows", []) if r["concurrency"] == 16), None)
    if row16:
        out.append(("router overhead, c=16: requests/s", f"≥ {TARGETS['overhead_rps_c16']:,}", _f(row16["rps"]),
                    row16["rps"] >= TARGETS["overhead_rps_c16"]))
        out.append(("router overhead, c=16: added p50", f"≤ {TARGETS['overhead_added_p50_ms_c16']} ms",
                    f"{_f(row16['added_p50_ms'], 2)} ms",
                    row16["added_p50_ms"] <= TARGETS["overhead_added_p50_ms_c16"]))
        out.append(("router overhead, c=16: added p99", f"≤ {TARGETS['overhead_added_p99_ms_c16']} ms",
                    f"{_f(row16['added_p99_ms'], 2)} ms",
                    row16["added_p99_ms"] <= TARGETS["overhead_added_p99_ms_c16"]))
    stream = sc.get("stream") or {}
    if stream.get("rows"):
        best = max(stream["rows"], key=lambda r: r["tokens_per_s"])
        out.append((f"stream relay: tokens/s (c={best['concurrency']})", f"≥ {TARGETS['stream_tokens_per_s']:,}",
                    _f(best["tokens_per_s"]), best["tokens_per_s"] >= TARGETS["stream_tokens_per_s"]))
    e2e = sc.get("e2e") or {}
    mesh = next((r for r in e2e.get("rows", []) if r["system"].startswith("velesio") and "skipped" not in r), None)
    if mesh:
        out.append(("end to end: mesh tokens/s ÷ raw", f"≥ {TARGETS['e2e_ratio']}", _f(mesh["ratio_tokens_per_s"], 3),
                    mesh["ratio_tokens_per_s"] >= TARGETS["e2e_ratio"]))
    scale = sc.get("scaling") or {}
    if scale.get("rows"):
        last = scale["rows"][-1]
        out.append((f"scaling: speedup at {last['workers']} workers", f"≥ {TARGETS['scaling_efficiency']} × "
                    f"{last['workers']}", _f(last["speedup"], 2), last["efficiency"] >= TARGETS["scaling_efficiency"]))
    two = sc.get("two-workers") or {}
    if two.get("rows"):
        out += two_worker_checks(two, TARGETS["two_workers_max_over_idle"])
    aff = sc.get("affinity") or {}
    if aff.get("summary"):
        out.append(("cache-aware routing: turn 2+ TTFT p50 ÷ least-loaded", f"≤ {TARGETS['affinity_ttft_ratio']}",
                    _f(aff["ttft_p50_ratio"], 2), aff["ttft_p50_ratio"] <= TARGETS["affinity_ttft_ratio"]))
        out.append(("cache-aware routing: tokens/s ÷ least-loaded", f"≥ {TARGETS['affinity_throughput_ratio']}",
                    _f(aff["throughput_ratio"], 2), aff["throughput_ratio"] >= TARGETS["affinity_throughput_ratio"]))
    fair = sc.get("fairness") or {}
    if fair.get("b_over_idle"):
        out.append(("fair share: B's p50 under A's flood ÷ idle", f"≤ {TARGETS['fairness_b_over_idle']}",
                    _f(fair["b_over_idle"], 2), fair["b_over_idle"] <= TARGETS["fairness_b_over_idle"]))
    peer = sc.get("server") or {}
    batched = [r for r in peer.get("rows", []) if r["system"] == "batched" and r.get("ratio") is not None
               and not math.isnan(r["ratio"])]
    if batched:
        worst = min(batched, key=lambda r: r["ratio"])
        cs = ", ".join(str(r["concurrency"]) for r in batched)
        out.append((f"side by side: mesh (batched) tokens/s ÷ llama-server's, worst of C = {cs} "
                    f"(C = {worst['concurrency']})", f"≥ {TARGETS['server_ratio']}", _f(worst["ratio"], 2),
                    worst["ratio"] >= TARGETS["server_ratio"]))
    pre = sc.get("prefix") or {}
    if pre.get("ratio") is not None:
        out.append(("prefix cache: second turn's TTFT ÷ cold", f"≤ {TARGETS['prefix_second_turn_ratio']}",
                    _f(pre["ratio"], 3), pre["ratio"] <= TARGETS["prefix_second_turn_ratio"]))
    mem = sc.get("memory") or {}
    if mem.get("opened"):
        out.append((f"router RSS with {mem['opened']:,} idle streams", f"≤ {TARGETS['idle_rss_mb']} MB",
                    f"{_f(mem['rss_open_mb'], 1)} MB", mem["rss_open_mb"] <= TARGETS["idle_rss_mb"]))
    return out


def choices_table(c: dict[str, Any]) -> list[str]:
    """Section 11: several completions of one prompt (bench/choices.py)."""
    if c.get("skipped"):
        return [f"**11. Several completions of one prompt** — skipped: {c['skipped']}", ""]
    lines = [f"**11. Several completions of one prompt** — one `/completion` with `n_cmpl` {c['n']} of a prompt of "
             f"about {c['prompt_tokens']} tokens (new each round), {c['n_predict']} tokens each, {c['threads']} "
             f"threads, {c['n']} sequences of {c['n_ctx']}; medians of {c['rounds']} round(s), ÷ llama-server: the "
             "median of each round's own ratio; prompt tokens evaluated: `timings.prompt_n` over the choices.", ""]
    return lines + _table(["system", "request ms", "time ÷ llama-server's", "prompt tokens evaluated"],
                          [[r["system"], _f(r["ms_p50"]), _f(r["ratio"], 2),
                            _f(r["prompt_tokens_evaluated"])] for r in c["rows"]]) + [""]


def server_table(p: dict[str, Any]) -> list[str]:
    """Section 9: the mesh side by side with llama.cpp's llama-server (bench/peer.py)."""
    if "skipped" in p:
        return [f"**9. Side by side with llama.cpp's server** — skipped: {p['skipped']}", ""]
    loads = [r["loadavg_1m_before"] for r in p.get("runs", [])]
    foreign = [r["foreign_cpu_share"] for r in p.get("runs", []) if r.get("foreign_cpu_share") is not None]
    noisy = sum(bool(r.get("noisy")) for r in p.get("runs", []))
    version = (p.get("llama_server") or {}).get("version")
    ttft = ("TTFT: client 0 streams and its time to the first token is measured (the other clients' requests are "
            "not streamed)" if p["probe"] else "no TTFT probe")
    lines = [f"**9. Side by side with llama.cpp's server** — {p['model']}, {p['threads']} threads, {p['n_ctx']} "
             f"tokens of context per sequence; C clients send back-to-back `/completion` requests of "
             f"{p['n_predict']} tokens (EOS ignored, a prompt of its own each); aggregate tokens/s over "
             f"{p['duration_s']:g} s after {p['warmup_s']:g} s of warm-up; the systems in turn, medians of "
             f"{p['rounds']} round(s); ÷ llama-server: the median of each round's own ratio. {ttft}; prompt_ms: "
             "what each server reports in `timings`. Systems: "
             + "; ".join(f"{k}: {v}" for k, v in p["labels"].items())
             + (f". llama-server {version}" if version else "")
             + (f". 1-minute load average before the runs {min(loads):.2f}–{max(loads):.2f} (it counts the "
                "systems' own threads, C × 2 spinning ones for the separate contexts)" if loads else "")
             + (f"; CPU used by other processes during the runs kept: at most {max(foreign):.0%} of the machine"
                if foreign else "")
             + (f"; {len(p['discarded'])} run(s) measured again (other processes above "
                f"{p['max_foreign_cpu']:.0%} of the CPU)" if p.get("discarded") else "")
             + (f"; {noisy} run(s) kept although other processes were above it (no quiet moment)" if noisy else "")
             + ".", ""]
    rows = [[str(r["concurrency"]), r["system"], _f(r["tokens_per_s"], 1), _f(r.get("ratio"), 2),
             _f(r["ttft_p50_ms"], 1), f"{_f(r['ttft_p99_ms'], 1)} ({r.get('ttft_n', 0)})", _f(r["prompt_ms_p50"], 1),
             f"{_f(r['prompt_ms_p99'], 1)} ({r.get('prompt_ms_n', 0)})", _f(r["latency_p50_ms"]), _f(r["failed"]),
             _f(r["tokens_ok"]), _f(r.get("failovers"))]
            for r in p["rows"]]
    return lines + _table(["C", "system", "tokens/s", "÷ llama-server", "TTFT p50 ms", "TTFT p99 ms (n)",
                           "prompt_ms p50", "prompt_ms p99 (n)", "request p50 ms", "failed", "all tokens",
                           "failovers"], rows) + [""]


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    sc = results["scenarios"]
    lines = [f"Machine: {summary_line(m)}; load average at end {' '.join(map(str, m.get('loadavg_end', [])))}.",
             f"Run: `{results['command']}` ({results['settings']['mode']}, router and worker event loop: "
             f"{results['settings']['loop']}), {results['elapsed_s']:.0f} s.", ""]
    if "overhead" in sc:
        o = sc["overhead"]
        base = o["in_process"]
        client = "wrk" if o.get("client") == "wrk" else "a Python aiohttp client (bench/loadgen.py)"
        lines += [f"**1. Router overhead** — `/completion` (llama.cpp dialect, {o['reply_bytes']}-byte reply), "
                  f"benchmark backend, load from {client}; in-process `run()`: p50 {base['p50_ms'] * 1e3:.1f} µs, "
                  f"p99 {base['p99_ms'] * 1e3:.1f} µs. Added = end to end − in process. CPU per request from "
                  "/proc (router, worker) and getrusage (client). Floors, same client: bare aiohttp (HTTP), and "
                  "bare aiohttp → ZeroMQ → echo process → back (HTTP + ZeroMQ). Medians of "
                  f"{o.get('rounds', 1)} round(s), the three systems measured in turn.", ""]
        floor = {r["concurrency"]: r for r in o.get("floor", [])}
        floor_zmq = {r["concurrency"]: r for r in o.get("floor_zmq", [])}
        rows = []
        for r in o["rows"]:
            f = floor.get(r["concurrency"], {})
            z = floor_zmq.get(r["concurrency"], {})
            rows.append([str(r["concurrency"]), _f(r["rps"]), _f(r["added_p50_ms"], 2), _f(r["added_p99_ms"], 2),
                         _f(r["router_cpu_us"]), _f(r["worker_cpu_us"]), _f(r["client_cpu_us"]),
                         _f(f.get("rps")), _f(f.get("p50_ms"), 2), _f(z.get("rps")), _f(z.get("p50_ms"), 2),
                         _f(r["errors"])])
        lines += _table(["concurrency", "req/s", "added p50 ms", "added p99 ms", "router µs/req", "worker µs/req",
                         "client µs/req", "HTTP floor req/s", "HTTP floor p50 ms", "HTTP + ZeroMQ floor req/s",
                         "HTTP + ZeroMQ floor p50 ms", "errors"], rows) + [""]
        if o.get("paced"):
            lines += ["Below saturation (a closed loop's latency is N ÷ throughput, the queue as much as the path): "
                      f"{o['paced'][0]['concurrency']} clients, each waiting a random time (mean T) between "
                      "requests, offering a share of the closed-loop rate.", ""]
            rows = [[f"{p['share']:.0%}", _f(p["think_ms"], 1), _f(p["rps"]), _f(p["added_p50_ms"], 2),
                     _f(p["added_p99_ms"], 2), _f(p["errors"])] for p in o["paced"]]
            lines += _table(["offered share", "T ms", "req/s", "added p50 ms", "added p99 ms", "errors"], rows) + [""]
    if "stream" in sc:
        st = sc["stream"]
        lines += [f"**2. Stream relay** — {st['tokens_per_stream']:,} tokens per stream, SSE through "
                  "`/completion`; tokens/s delivered to all clients together (median over rounds).", ""]
        rows = [[str(r["concurrency"]), _f(r["tokens_per_s"]), _f(r["stream_tokens_per_s"]), _f(r["ttft_p50_ms"], 2),
                 _f(r["ttft_p99_ms"], 2), _f(r["router_cpu_us_per_token"], 1), _f(r["worker_cpu_us_per_token"], 1),
                 _f(r["client_cpu_us_per_token"], 1), _f(r["tokens_ok"]), _f(r["one_event_per_chunk"]),
                 _f(r.get("failovers"))] for r in st["rows"]]
        lines += _table(["streams", "tokens/s", "per stream tokens/s", "TTFT p50 ms", "TTFT p99 ms",
                         "router µs/token", "worker µs/token", "client µs/token", "all tokens", "1 event per chunk",
                         "failovers"], rows) + [""]
    if "e2e" in sc:
        e = sc["e2e"]
        if "skipped" in e:
            lines += [f"**3. End to end** — skipped: {e['skipped']}", ""]
        else:
            lines += [f"**3. End to end** — {e['model']}, {e['n_predict']} tokens (end of generation banned), "
                      f"{e['threads']} threads, one request at a time, the three systems taking turns; median of "
                      f"{e['reps']} rounds after one warm-up round; ÷ raw: the median of each round's own "
                      "ratio (the ratio of the medians in brackets).", ""]
            rows = [[f"{r['system']} (skipped: {r['skipped'][:80]})", "–", "–", "–", "–", "–"] if "skipped" in r else
                    [r["system"], _f(r["ttft_p50_ms"], 1), _f(r["decode_tokens_per_s"], 1), _f(r["tokens_per_s"], 1),
                     f"{_f(r['ratio_tokens_per_s'], 3)} ({_f(r.get('ratio_of_medians'), 3)})",
                     _f(r["ratio_ttft"], 2)] for r in e["rows"]]
            lines += _table(["system", "TTFT p50 ms", "tokens/s after first", "tokens/s overall",
                             "tokens/s ÷ raw", "TTFT ÷ raw"], rows) + [""]
    if "scaling" in sc:
        s = sc["scaling"]
        lines += [f"**4. Scaling** — workers with the benchmark backend at {s['delay_ms']} ms per job, 1 slot each, "
                  "2 × N clients; jobs per worker from /health.", ""]
        rows = [[str(r["workers"]), _f(r["rps"], 1), _f(r["ideal_rps"]), _f(r["speedup"], 2), _f(r["efficiency"], 3),
                 " / ".join(map(str, r["jobs_per_worker"])), _f(r["balance"], 2)] for r in s["rows"]]
        lines += _table(["workers", "req/s", "ideal req/s", "speedup", "speedup ÷ N", "jobs per worker",
                         "min ÷ max"], rows) + [""]
    if "memory" in sc:
        mm = sc["memory"]
        lines += [f"**5. Memory** — router RSS (VmRSS) idle after warm-up, then with {mm['opened']:,} open idle "
                  f"streams (each dispatched, waiting for its first token), then after they closed.", ""]
        lines += _table(["idle MB", f"{mm['opened']:,} streams MB", "KB per stream", "after MB"],
                        [[_f(mm["rss_idle_mb"], 1), _f(mm["rss_open_mb"], 1), _f(mm["kb_per_stream"], 1),
                          _f(mm["rss_after_mb"], 1)]]) + [""]
    if "two-workers" in sc:
        t = sc["two-workers"]
        if "skipped" in t:
            lines += [f"**6. Two workers per host** — skipped: {t['skipped']}", ""]
        else:
            lines += [f"**6. Two workers per host** — {t['model']} (1 slot per worker) on {t['cores']} cores: (a) "
                      "one worker, (b) two workers with their default threads, (c) two workers with every core "
                      f"each; {t['clients']} clients share {t['requests']} chat completions per reply length "
                      f"(a phase ends after {t['deadline_s']:g} s: what is still open is unanswered); idle: one "
                      f"client alone, p50 of {t['idle_requests']}.", ""]
            rows = [[f"({TWO_WORKER_SYSTEMS.get(r['system'], '?')}) {r['system']}", r["threads"], str(r["max_tokens"]),
                     f"{r['ok']} / {r['requests']}", _f(r["rps"], 2), _f(r["tokens_per_s"]), _f(r["p50_ms"]),
                     _f(r["p99_ms"]), _f(r["max_ms"]), _f(r["idle_p50_ms"]),
                     "–" if r["max_over_idle"] is None else _f(r["max_over_idle"], 1),
                     " / ".join(map(str, r["jobs_per_worker"]))] for r in t["rows"]]
            lines += _table(["system", "threads per worker", "max_tokens", "answered", "req/s", "tokens/s",
                             "p50 ms", "p99 ms", "max ms", "idle p50 ms", "max ÷ idle", "jobs per worker"],
                            rows) + [""]
    if "affinity" in sc:
        a = sc["affinity"]
        lines += [f"**7. Cache-aware routing** — {a['workers']} workers ({a['slots']} slots, "
                  f"{a.get('cache_sequences', 0)} cached sequences, {a['threads']} thread "
                  f"each), {a['conversations']} conversations of {a['turns']} turns sharing a system prompt, all at "
                  f"once, {a['max_tokens']} tokens per reply; medians of {len(a['rounds']['cache_aware'])} rounds "
                  "per mode, the modes in turn.", ""]
        rows = [[mode, _f(r["turn2_ttft_p50_ms"]), _f(r["turn2_ttft_p99_ms"]), _f(r["completion_tokens_per_s"], 1),
                 f"{_f(r['prompt_tokens_evaluated'])} of {_f(r['prompt_tokens'])}", str(r["failed"])]
                for mode, r in a["summary"].items()]
        lines += _table(["routing", "turn 2+ TTFT p50 ms", "p99 ms", "tokens/s", "prompt tokens evaluated",
                         "failed"], rows) + [""]
    if "fairness" in sc:
        f = sc["fairness"]
        lines += [f"**8. Fair share** — one worker; token A sends {f['flood']} requests at once, token B one a "
                  f"second ({f['b_requests']}), {f['max_tokens']} tokens each.", ""]
        lines += _table(["idle p50 ms", "B p50 ms", "B max ms", "B ÷ idle", "A p50 s", "A still waiting after B"],
                        [[_f(f["idle_p50_s"] * 1e3), _f(f["b_p50_s"] * 1e3), _f(f["b_max_s"] * 1e3),
                          _f(f["b_over_idle"], 2), _f(f["a_p50_s"], 1), str(f["a_still_waiting_after_b"])]]) + [""]
    if "server" in sc:
        lines += server_table(sc["server"])
    if "prefix" in sc:
        f = sc["prefix"]
        lines += [f"**10. Prefix cache** — one worker (4 slots, 2 threads); {f['rounds']} conversations, each a "
                  f"first turn of {f['prompt_tokens']} prompt tokens and a second turn that extends it; TTFT "
                  "streamed, medians.", ""]
        lines += _table(["cold TTFT p50 ms", "second turn TTFT p50 ms", "from the cache", "ratio"],
                        [[_f(f["cold_ttft_p50_ms"]), _f(f["second_ttft_p50_ms"]), _f(f["cache_n_p50"]),
                          _f(f["ratio"], 3)]]) + [""]
    if "choices" in sc:
        lines += choices_table(sc["choices"])
    ck = checks(results)
    if ck:
        lines += ["**Targets** (for a 2-core machine)", ""]
        lines += _table(["what", "target", "measured", "met"], [[a, b, c, "yes" if d else "no"] for a, b, c, d in ck])
    return "\n".join(lines) + "\n"
