"""The load generator: an asyncio aiohttp client that runs in its own process (``python -m bench.loadgen SPEC``),
so that it never shares the router's event loop. SPEC is a JSON object; the result is one JSON line on stdout.

Modes:

- ``requests``: a closed loop of ``concurrency`` clients, each sending the next request when the last one
  answered, for ``warmup`` + ``duration`` seconds; latencies of the requests started after the warm-up.
- ``streams``: rounds of ``concurrency`` streams started together; per stream the time to the first
  token, the tokens, the HTTP chunks and SSE events; per round the tokens delivered per second.
- ``each``: one stream per line read on stdin, one JSON line printed per stream, on one session kept
  open (its connection warm) until EOF; the end-to-end scenario drives it turn about with other systems.
- ``hold``: opens ``count`` streams, prints ``READY <open>`` once their headers came, holds them until a
  line (or EOF) arrives on stdin, then closes them.
- ``batch``: ``total`` requests shared by ``concurrency`` clients in a closed loop, ended at ``deadline``
  seconds (requests still open then are cancelled: unanswered); per request its latency, HTTP status and
  ``usage.completion_tokens``.
- ``completions``: a closed loop of ``concurrency`` clients sending llama.cpp ``/completion`` requests, each
  with its own prompt (``prompt_format`` filled with a number unique to the run and a topic), until
  ``warmup`` + ``duration`` seconds; the requests open then finish. Non-streamed, except client 0 when
  ``probe`` is set: it streams, and its time to the first token is the client-observed TTFT. Per request
  its start and end (seconds from the start), tokens predicted and the server's ``timings``.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any

import aiohttp

try:  # the client is cheaper on uvloop; it is only the load generator's loop, never the router's
    import uvloop
except ImportError:  # pragma: no cover
    uvloop = None


def _session(limit: int = 0) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0, ttl_dns_cache=None, use_dns_cache=True)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None, sock_read=120),
                                 skip_auto_headers=("User-Agent",))


async def run_requests(spec: dict[str, Any]) -> dict[str, Any]:
    url, headers = spec["url"], spec.get("headers") or {}
    data = json.dumps(spec["body"]).encode()
    concurrency, warmup, duration = int(spec["concurrency"]), float(spec["warmup"]), float(spec["duration"])
    latencies: list[int] = []
    errors: list[str] = []
    done_in_window = done_all = 0
    async with _session(concurrency) as session:
        start = time.perf_counter()
        record_from, stop_at = start + warmup, start + warmup + duration

        async def client() -> None:
            nonlocal done_in_window, done_all
            perf = time.perf_counter
            while True:
                t0 = perf()
                if t0 >= stop_at:
                    return
                try:
                    async with session.post(url, data=data, headers=headers) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    status, exc_text = 0, f"{type(exc).__name__}: {exc}"
                t1 = perf()
                done_all += 1
                if t1 > record_from and t1 <= stop_at:
                    done_in_window += 1
                if t0 >= record_from:
                    if status == 200:
                        latencies.append(int((t1 - t0) * 1e6))
                    else:
                        errors.append(f"HTTP {status}" if status else exc_text)

        await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"latencies_us": latencies, "errors": len(errors), "error_sample": errors[:3],
            "completed": done_in_window, "completed_all": done_all, "window_s": duration}


def _text_of(event: bytes) -> str:
    """The generated text an SSE event carries (llama.cpp ``content``, OpenAI ``choices[0]``)."""
    if event.strip() == b"[DONE]":
        return ""
    obj = json.loads(event)
    if "content" in obj:
        return obj.get("content") or ""
    choice = (obj.get("choices") or [{}])[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def one_stream(session: aiohttp.ClientSession, url: str, data: bytes, headers: dict[str, str],
                     parse: bool) -> dict[str, Any]:
    """One SSE stream. Without ``parse`` every event but the last counts as one token (the benchmark backend
    sends one token per event and llama.cpp's dialect ends with one ``stop`` event)."""
    perf = time.perf_counter
    t0 = perf()
    ttft = t_last = None
    events = tokens = 0
    pending = b""
    async with session.post(url, data=data, headers=headers) as r:
        if r.status != 200:
            return {"ok": False, "error": f"HTTP {r.status}: {(await r.read())[:200]!r}"}
        async for data_piece in r.content.iter_any():
            now = perf()
            if parse:
                pending += data_piece
                *whole, pending = pending.split(b"\n\n")
                for raw in whole:
                    if not raw.startswith(b"data: "):
                        continue
                    events += 1
                    if _text_of(raw[6:]):
                        tokens += 1
                        t_last = now
                        if ttft is None:
                            ttft = now - t0
            else:
                # "data: " is 6 bytes: the last 5 of the previous piece catch one split across pieces.
                n = (pending + data_piece).count(b"data: ")
                pending = data_piece[-5:]
                if n:
                    events += n
                    t_last = now
                    if ttft is None:
                        ttft = now - t0
    end = perf()
    if not parse:
        tokens = max(0, events - 1)
    return {"ok": True, "ttft": ttft, "tokens": tokens, "events": events,
            "t_last": (t_last - t0) if t_last is not None else None, "total": end - t0}


async def run_streams(spec: dict[str, Any]) -> dict[str, Any]:
    url, headers = spec["url"], spec.get("headers") or {}
    data = json.dumps(spec["body"]).encode()
    concurrency = int(spec["concurrency"])
    duration, min_rounds = float(spec.get("duration", 0)), int(spec.get("min_rounds", 1))
    max_rounds, warmup_rounds = int(spec.get("max_rounds", 1000)), int(spec.get("warmup_rounds", 1))
    parse = bool(spec.get("parse", False))
    rounds: list[dict[str, Any]] = []
    warmup_tokens = 0
    async with _session() as session:
        for _ in range(warmup_rounds):
            streams = await asyncio.gather(*(one_stream(session, url, data, headers, parse)
                                             for _ in range(concurrency)))
            warmup_tokens += sum(st.get("tokens", 0) for st in streams)
        start = time.perf_counter()
        while len(rounds) < max_rounds and (len(rounds) < min_rounds or time.perf_counter() - start < duration):
            t0 = time.perf_counter()
            streams = await asyncio.gather(*(one_stream(session, url, data, headers, parse)
                                             for _ in range(concurrency)))
            rounds.append({"wall": time.perf_counter() - t0, "streams": streams})
    return {"rounds": rounds, "warmup_tokens": warmup_tokens}


async def run_each(spec: dict[str, Any]) -> dict[str, Any]:
    url, headers = spec["url"], spec.get("headers") or {}
    data = json.dumps(spec["body"]).encode()
    loop = asyncio.get_running_loop()
    async with _session() as session:
        while await loop.run_in_executor(None, sys.stdin.readline):
            result = await one_stream(session, url, data, headers, bool(spec.get("parse", False)))
            sys.stdout.write(json.dumps(result) + "\n")
            sys.stdout.flush()
    return {}


async def run_hold(spec: dict[str, Any]) -> dict[str, Any]:
    url, headers = spec["url"], spec.get("headers") or {}
    data = json.dumps(spec["body"]).encode()
    count, batch = int(spec["count"]), int(spec.get("batch", 100))
    opened: list[aiohttp.ClientResponse] = []
    errors: list[str] = []
    async with _session() as session:
        async def open_one() -> None:
            try:
                r = await session.post(url, data=data, headers=headers)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            if r.status == 200:
                opened.append(r)
            else:
                errors.append(f"HTTP {r.status}")
                r.release()

        for i in range(0, count, batch):
            await asyncio.gather(*(open_one() for _ in range(min(batch, count - i))))
        print(f"READY {len(opened)}", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for r in opened:
            r.close()
    return {"opened": len(opened), "errors": len(errors), "error_sample": errors[:3]}


async def framed_stream(url: str, data: bytes, headers: dict[str, str]) -> dict[str, int]:
    """One stream read off a plain socket, HTTP chunk by HTTP chunk: how many chunks carried exactly one SSE
    event and how many did not (LLM for Unity parses every network chunk as one JSON object)."""
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, _, port = hostport.partition(":")
    reader, writer = await asyncio.open_connection(host, int(port or 80))
    head = [f"POST /{path} HTTP/1.1", f"Host: {hostport}", f"Content-Length: {len(data)}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    good = bad = 0
    try:
        status = await reader.readuntil(b"\r\n\r\n")
        if b" 200 " not in status.split(b"\r\n", 1)[0] or b"chunked" not in status.lower():
            return {"good": 0, "bad": 1}
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            if size == 0:
                break
            chunk = (await reader.readexactly(size + 2))[:-2]
            if chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"\n\n") == 1:
                good += 1
            else:
                bad += 1
    finally:
        writer.close()
    return {"good": good, "bad": bad}


async def run_framing(spec: dict[str, Any]) -> dict[str, Any]:
    data = json.dumps(spec["body"]).encode()
    results = await asyncio.gather(*(framed_stream(spec["url"], data, spec.get("headers") or {})
                                     for _ in range(int(spec["concurrency"]))))
    return {"chunks_one_event": sum(r["good"] for r in results), "chunks_other": sum(r["bad"] for r in results)}


async def run_batch(spec: dict[str, Any]) -> dict[str, Any]:
    url, headers = spec["url"], spec.get("headers") or {}
    data = json.dumps(spec["body"]).encode()
    total, concurrency, deadline = int(spec["total"]), int(spec["concurrency"]), float(spec["deadline"])
    done: list[dict[str, Any]] = []
    issued = 0
    async with _session(concurrency) as session:
        perf = time.perf_counter
        start = perf()

        async def client() -> None:
            nonlocal issued
            while issued < total:
                issued += 1
                t0 = perf()
                tokens = None
                try:
                    async with session.post(url, data=data, headers=headers) as r:
                        body = await r.read()
                        status = r.status
                    if status == 200:
                        tokens = (json.loads(body).get("usage") or {}).get("completion_tokens")
                    error = None if status == 200 else f"HTTP {status}: {body[:200]!r}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                    status, error = 0, f"{type(exc).__name__}: {exc}"
                done.append({"start": t0 - start, "latency": perf() - t0, "status": status, "tokens": tokens,
                             "error": error})

        tasks = [asyncio.ensure_future(client()) for _ in range(concurrency)]
        _, pending = await asyncio.wait(tasks, timeout=deadline)
        for task in pending:  # the deadline: what is still open is cancelled and counted as unanswered
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = perf() - start
    return {"total": total, "issued": issued, "answered": len(done), "unanswered": issued - len(done),
            "deadline_hit": bool(pending), "wall_s": min(wall, deadline) if pending else wall, "requests": done}


def _completion_final(obj: dict[str, Any]) -> dict[str, Any]:
    timings = obj.get("timings") or {}
    tokens = obj.get("tokens_predicted")
    if tokens is None:
        tokens = timings.get("predicted_n", (obj.get("usage") or {}).get("completion_tokens"))
    return {"tokens": tokens, "prompt_ms": timings.get("prompt_ms"), "predicted_ms": timings.get("predicted_ms"),
            "prompt_n": timings.get("prompt_n", obj.get("tokens_evaluated"))}


async def one_completion(session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str],
                         stream: bool) -> dict[str, Any]:
    """One llama.cpp ``/completion`` request: non-streamed, or streamed (then with its time to first token)."""
    perf = time.perf_counter
    t0 = perf()
    out: dict[str, Any] = {"stream": stream, "ttft": None}
    async with session.post(url, data=json.dumps({**body, "stream": stream}).encode(), headers=headers) as r:
        out["status"] = r.status
        if r.status != 200:
            out["error"] = f"HTTP {r.status}: {(await r.read())[:200]!r}"
            return out
        if not stream:
            out.update(_completion_final(json.loads(await r.read())))
            return out
        pending = b""
        async for piece in r.content.iter_any():
            pending += piece
            *whole, pending = pending.split(b"\n\n")
            for raw in whole:
                if not raw.startswith(b"data: ") or raw[6:].strip() == b"[DONE]":
                    continue
                obj = json.loads(raw[6:])
                if out["ttft"] is None and obj.get("content"):
                    out["ttft"] = perf() - t0
                if obj.get("stop"):
                    out.update(_completion_final(obj))
    return out


async def run_completions(spec: dict[str, Any]) -> dict[str, Any]:
    url, headers, body = spec["url"], spec.get("headers") or {}, spec["body"]
    concurrency, warmup, duration = int(spec["concurrency"]), float(spec["warmup"]), float(spec["duration"])
    topics, fmt, probe = spec["topics"], spec["prompt_format"], bool(spec.get("probe"))
    counter = int(spec.get("first", 0))
    done: list[dict[str, Any]] = []
    async with _session(concurrency) as session:
        perf = time.perf_counter
        start = perf()
        stop_at = start + warmup + duration

        async def client(i: int) -> None:
            nonlocal counter
            while perf() < stop_at:
                n, counter = counter, counter + 1
                prompt = fmt.format(n=n, topic=topics[n % len(topics)])
                t0 = perf()
                attempts = 0
                while attempts < 2:
                    attempts += 1
                    try:
                        res = await one_completion(session, url, {**body, "prompt": prompt}, headers,
                                                   probe and i == 0)
                        break
                    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                        # A kept-alive connection the server had closed: the request never reached it; once more.
                        res = {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
                    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                        res = {"status": 0, "error": f"{type(exc).__name__}: {exc}"}
                        break
                done.append({"client": i, "start": t0 - start, "end": perf() - start, "attempts": attempts, **res})

        await asyncio.gather(*(client(i) for i in range(concurrency)))
    return {"window": [warmup, warmup + duration], "requests": done, "next": counter}


MODES = {"requests": run_requests, "streams": run_streams, "each": run_each, "hold": run_hold,
         "framing": run_framing, "batch": run_batch,
         "completions": run_completions}


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    before = resource.getrusage(resource.RUSAGE_SELF)  # start-up (imports) is not the load's cost
    coro = MODES[spec["mode"]](spec)
    result = uvloop.run(coro) if uvloop is not None else asyncio.run(coro)
    after = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
