"""Routing scenarios (docs/performance.md): cache-aware vs least-loaded routing of multi-turn conversations,
and fair share between a token that floods a model and one that does not. Real router and workers on the
embedded SmolLM2; the clients run here, on aiohttp."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

from .cluster import Cluster
from .common import Log, Settings, pct

SMOLLM2 = "smollm2-135m-instruct"
SYSTEM = ("You are Mira, the innkeeper of the Silver Stag, a tavern in a small mountain village. Guests ask "
          "you about rooms, food, the roads and the rumours of the valley. You answer kindly and briefly, "
          "in one or two sentences, and you never break character. The village has a blacksmith, a temple "
          "of the moon, a market on the first day of the week, and a mine that closed ten years ago.")
QUESTIONS = ["Do you have a room for tonight?", "How much does it cost?", "Is breakfast included?",
             "What is the news from the mine?", "Which road leads to the city?", "Thank you, good night."]


def model(slots: int, threads: int, cache_sequences: int = 0) -> dict[str, Any]:
    return {"name": SMOLLM2, "backend": "llama-cpp", "slots": slots,
            "options": {"n_ctx": 2048, "n_threads": threads, "cache_sequences": cache_sequences}}


async def _turn(session: Any, url: str, headers: dict[str, str], messages: list[dict[str, str]],
                max_tokens: int) -> dict[str, Any]:
    """One streamed chat turn: time to first token, the reply, and the usage the router reports."""
    body = {"model": SMOLLM2, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft = None
    text: list[str] = []
    usage: dict[str, Any] = {}
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status != 200:
            return {"ok": False, "error": (await resp.text())[:200]}
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - start
                    text.append(piece)
    return {"ok": True, "ttft": ttft if ttft is not None else time.perf_counter() - start,
            "total": time.perf_counter() - start, "text": "".join(text), "usage": usage}


async def _conversations(url: str, headers: dict[str, str], n: int, turns: int, max_tokens: int,
                         think_s: float = 1.0) -> dict[str, Any]:
    """``n`` conversations at once; each player "thinks" a random 0..``think_s`` seconds before each turn
    (seeded: both routing modes see the same schedule), so turns do not arrive in lockstep."""
    import random

    import aiohttp

    results: list[dict[str, Any]] = []

    async def conversation(i: int) -> None:
        rng = random.Random(i)
        messages = [{"role": "system", "content": SYSTEM}]
        for t in range(turns):
            await asyncio.sleep(rng.uniform(0, think_s))
            messages.append({"role": "user", "content": f"(guest {i}) {QUESTIONS[t % len(QUESTIONS)]}"})
            r = await _turn(session, url, headers, messages, max_tokens)
            results.append({**r, "turn": t})
            if not r["ok"]:
                return
            messages.append({"role": "assistant", "content": r["text"]})

    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(conversation(i) for i in range(n)))
        wall = time.perf_counter() - start
    good = [r for r in results if r["ok"]]
    later = [r["ttft"] * 1e3 for r in good if r["turn"] >= 1]
    completion = sum(int(r["usage"].get("completion_tokens") or 0) for r in good)
    prompt = sum(int(r["usage"].get("prompt_tokens") or 0) for r in good)
    cached = sum(int((r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0) for r in good)
    return {"turns": len(results), "failed": len(results) - len(good), "wall_s": wall,
            "turn2_ttft_p50_ms": pct(later, 50), "turn2_ttft_p99_ms": pct(later, 99),
            "completion_tokens_per_s": completion / wall if wall else float("nan"),
            "prompt_tokens": prompt, "prompt_tokens_cached": cached, "prompt_tokens_evaluated": prompt - cached}


def affinity(s: Settings, workdir: Path, log: Log) -> dict[str, Any]:
    """4 workers, 32 conversations of 6 turns sharing a system prompt, all at once: cache-aware routing vs
    least-loaded, the modes in turn (``s.routing_rounds`` rounds each), medians reported."""
    rows: dict[str, list[dict[str, Any]]] = {"cache_aware": [], "least_loaded": []}
    for _round in range(s.routing_rounds):
        for mode in rows:
            with Cluster(workdir, loop=s.loop, router_cfg={"routing": mode}) as mesh:
                mesh.start_router()
                mesh.start_workers([f"conv-{i}" for i in range(s.routing_workers)],
                                   [model(s.routing_slots, s.routing_threads, s.routing_cache_sequences)])
                res = asyncio.run(_conversations(mesh.url, mesh.headers, s.routing_conversations, s.routing_turns,
                                                 s.routing_max_tokens))
            rows[mode].append(res)
            log(f"  {mode:<12} turn 2+ TTFT p50 {res['turn2_ttft_p50_ms']:7.1f} ms  p99 "
                f"{res['turn2_ttft_p99_ms']:7.1f} ms  {res['completion_tokens_per_s']:6.1f} tokens/s  prompt tokens "
                f"evaluated {res['prompt_tokens_evaluated']} of {res['prompt_tokens']}  failed {res['failed']}")
    summary = {mode: {key: statistics.median(r[key] for r in runs) for key in runs[0] if key != "failed"}
               | {"failed": sum(r["failed"] for r in runs)} for mode, runs in rows.items()}
    ca, ll = summary["cache_aware"], summary["least_loaded"]
    return {"workers": s.routing_workers, "slots": s.routing_slots, "threads": s.routing_threads,
            "cache_sequences": s.routing_cache_sequences, "conversations": s.routing_conversations,
            "turns": s.routing_turns, "max_tokens": s.routing_max_tokens,
            "rounds": rows, "summary": summary,
            "ttft_p50_ratio": ca["turn2_ttft_p50_ms"] / ll["turn2_ttft_p50_ms"],
            "throughput_ratio": ca["completion_tokens_per_s"] / ll["completion_tokens_per_s"]}


async def _fairness(url: str, headers_a: dict[str, str], headers_b: dict[str, str], flood: int, b_requests: int,
                    max_tokens: int) -> dict[str, Any]:
    import aiohttp

    body = {"model": SMOLLM2, "prompt": "Write the numbers from one to twenty:", "max_tokens": max_tokens,
            "temperature": 0}

    async def one(session: Any, headers: dict[str, str]) -> float:
        start = time.perf_counter()
        async with session.post(url + "/v1/completions", json=body, headers=headers) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}")
        return time.perf_counter() - start

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_read=900)) as session:
        idle = [await one(session, headers_b) for _ in range(3)]
        flood_tasks = [asyncio.create_task(one(session, headers_a)) for _ in range(flood)]
        await asyncio.sleep(1.0)
        waits = []
        for _ in range(b_requests):
            started = time.perf_counter()
            waits.append(await one(session, headers_b))
            await asyncio.sleep(max(0.0, 1.0 - (time.perf_counter() - started)))
        a_left = sum(not t.done() for t in flood_tasks)
        a_times = await asyncio.gather(*flood_tasks)
    return {"idle_p50_s": statistics.median(idle), "b_p50_s": statistics.median(waits), "b_max_s": max(waits),
            "a_p50_s": statistics.median(a_times), "a_still_waiting_after_b": a_left}


def fairness(s: Settings, workdir: Path, log: Log) -> dict[str, Any]:
    """One worker; token A floods 200 requests while token B sends one request a second: B's latency
    against an idle system's."""
    # API_TOKENS "tok-flood,tok-steady" names them token-1 and token-2
    router_cfg = {"token_limits": {name: {"requests_per_minute": 100000, "concurrent": 10000}
                                   for name in ("token-1", "token-2")}, "queue_max": 10000}
    with Cluster(workdir, loop=s.loop, router_cfg=router_cfg, api_tokens="tok-flood,tok-steady") as mesh:
        mesh.start_router()
        mesh.start_workers(["fair-1"], [model(s.routing_slots, 2)])
        base = {"Content-Type": "application/json"}
        res = asyncio.run(_fairness(mesh.url, {**base, "Authorization": "Bearer tok-flood"},
                                    {**base, "Authorization": "Bearer tok-steady"}, s.fair_flood, s.fair_b_requests,
                                    s.fair_max_tokens))
    res["b_over_idle"] = res["b_p50_s"] / res["idle_p50_s"]
    log(f"  idle p50 {res['idle_p50_s'] * 1e3:.0f} ms; B under A's flood p50 {res['b_p50_s'] * 1e3:.0f} ms "
        f"(x{res['b_over_idle']:.2f}), max {res['b_max_s'] * 1e3:.0f} ms; A p50 {res['a_p50_s']:.1f} s; "
        f"A requests still waiting when B finished: {res['a_still_waiting_after_b']}")
    return {"flood": s.fair_flood, "b_requests": s.fair_b_requests, "max_tokens": s.fair_max_tokens, **res}


def prefix_cache(s: Settings, workdir: Path, log: Log) -> dict[str, Any]:
    """A conversation's second turn against its first: a prompt of about 1,000 tokens (a prefix of its own
    each round), then the same prefix with the next turn appended; time to first token of each, streamed,
    one worker (4 slots, 2 threads). The second turn's prefix comes from the worker's prefix cache."""
    import requests

    base = ("The old lighthouse keeper wrote in his journal every evening about the ships, the weather and "
            "the birds. ")
    cold: list[float] = []
    warm: list[float] = []
    cached: list[int] = []
    with Cluster(workdir, loop=s.loop) as mesh:
        mesh.start_router()
        mesh.start_workers(["prefix-1"], [model(4, 2)])

        def turn(prompt: str) -> tuple[float, dict[str, Any]]:
            body = {"prompt": prompt, "n_predict": 4, "temperature": 0, "stream": True}
            start = time.perf_counter()
            first, final = None, {}
            with requests.post(mesh.url + "/completion", json=body, headers=mesh.headers, stream=True,
                               timeout=300) as resp:
                for line in resp.iter_lines():
                    if line:
                        first = first if first is not None else time.perf_counter() - start
                        final = json.loads(line[len(b"data: "):])
            return first if first is not None else float("nan"), final

        for i in range(s.prefix_rounds):
            prefix = f"Story {i}. " + base * 45
            cold.append(turn(prefix + " Chapter one:")[0])
            t, final = turn(prefix + " Chapter one: It was a calm night. Chapter two:")
            warm.append(t)
            cached.append(int((final.get("timings") or {}).get("cache_n") or 0))
            prompt_n = int(final.get("tokens_evaluated") or 0)
    res = {"rounds": s.prefix_rounds, "prompt_tokens": prompt_n, "cache_n_p50": statistics.median(cached),
           "cold_ttft_p50_ms": statistics.median(cold) * 1e3, "second_ttft_p50_ms": statistics.median(warm) * 1e3}
    res["ratio"] = res["second_ttft_p50_ms"] / res["cold_ttft_p50_ms"]
    log(f"  {prompt_n} prompt tokens: cold TTFT p50 {res['cold_ttft_p50_ms']:.0f} ms, second turn "
        f"{res['second_ttft_p50_ms']:.0f} ms ({res['cache_n_p50']:.0f} from the cache), ratio {res['ratio']:.3f}")
    return res
