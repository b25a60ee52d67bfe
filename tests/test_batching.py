"""The batching engine behind a real router and worker (backends/llama_engine): sequences decoded together
give each request the text it gets alone, a cancelled one leaves the others alone, a grammar and a free
sequence share a batch, the prefix cache is hit and missed as it should, and a full context ends cleanly."""

from __future__ import annotations

import concurrent.futures
import json
import time
from typing import Any

import pytest
import requests

from conftest import SMOLLM2

THINGS = ["sea", "mountains", "a lighthouse", "the moon", "a forest", "bread", "a violin", "winter"]


@pytest.fixture(scope="module")
def batched(start_router, start_worker):
    from velesio.backends.llama import embedded_model_path

    router = start_router()
    small = {"name": "smollm2-ctx128", "backend": "llama-cpp", "path": embedded_model_path(), "slots": 2,
             "options": {"n_ctx": 128, "n_threads": 1}}
    start_worker(router, "batched-1", [{**SMOLLM2, "slots": 8}, small])
    return router


def stream(router, body: dict[str, Any], stop_after: int | None = None) -> dict[str, Any]:
    """A llama.cpp-dialect stream: its text, its events, and when it started and ended."""
    started = time.monotonic()
    events: list[dict[str, Any]] = []
    with requests.post(router.url + "/completion", json={**body, "stream": True}, headers=router.headers,
                       stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if line:
                events.append(json.loads(line[len(b"data: "):]))
                if stop_after is not None and len(events) >= stop_after:
                    break  # the client goes away: the job is cancelled
    return {"text": "".join(e.get("content", "") for e in events), "events": events, "start": started,
            "end": time.monotonic()}


def greedy(thing: str, n: int = 24) -> dict[str, Any]:
    return {"prompt": f"Write one sentence about {thing}:", "n_predict": n, "temperature": 0, "seed": 7,
            "ignore_eos": True, "cache_prompt": False}


def test_sequences_decoded_together_give_the_text_each_gets_alone(batched):
    bodies = [greedy(thing) for thing in THINGS]
    alone = [stream(batched, b)["text"] for b in bodies]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: stream(batched, b), bodies))
    assert [t["text"] for t in together] == alone
    # They did run together: some stream started before another had ended.
    assert any(a["start"] < b["end"] and b["start"] < a["end"] for a in together for b in together if a is not b)
    final = together[0]["events"][-1]
    assert final["stop"] is True and final["tokens_predicted"] == 24


def test_a_cancelled_sequence_leaves_the_others_alone(batched):
    bodies = [greedy(thing, 48) for thing in THINGS[:3]]
    alone = [stream(batched, b)["text"] for b in bodies[1:]]
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        gone = pool.submit(stream, batched, bodies[0], 3)
        kept = [pool.submit(stream, batched, b) for b in bodies[1:]]
        assert len(gone.result()["events"]) == 3
        assert [k.result()["text"] for k in kept] == alone


def test_a_grammar_and_a_free_sequence_share_a_batch(batched):
    free = greedy("the river", 32)
    constrained = {"prompt": "Is water wet? Answer:", "n_predict": 8, "temperature": 0.8,
                   "grammar": 'root ::= " yes" | " no"'}
    free_alone = stream(batched, free)["text"]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(stream, batched, constrained) for _ in range(3)]
        together = pool.submit(stream, batched, free)
        assert {a.result()["text"] for a in answers} <= {" yes", " no"}
        assert together.result()["text"] == free_alone


def test_the_prefix_cache_is_hit_on_the_next_turn_and_missed_after_an_early_change(batched):
    story = "Once upon a time, in a village by the sea, there lived an old fisherman and his wife. " * 6
    first = batched.post("/completion", {"prompt": story, "n_predict": 4, "temperature": 0}).json()
    assert first["timings"]["cache_n"] == 0 or first["timings"]["cache_n"] < first["tokens_evaluated"]
    second = batched.post("/completion", {"prompt": story + " One morning", "n_predict": 4,
                                          "temperature": 0}).json()
    assert second["timings"]["cache_n"] >= first["tokens_evaluated"] - 1
    assert second["timings"]["prompt_n"] + second["timings"]["cache_n"] == second["tokens_evaluated"]
    changed = batched.post("/completion", {"prompt": "Twice" + story[4:], "n_predict": 4, "temperature": 0}).json()
    assert changed["timings"]["cache_n"] <= 2  # at most the start of text and what precedes the change
    chat = {"messages": [{"role": "system", "content": story}, {"role": "user", "content": "Who lived there?"}],
            "max_tokens": 4, "temperature": 0}
    batched.post("/v1/chat/completions", chat)
    again = batched.post("/v1/chat/completions", chat).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_a_sequence_that_fills_its_context_ends_cleanly(batched):
    body = {"model": "smollm2-ctx128", "prompt": "Count: one, two, three,", "n_predict": -1, "ignore_eos": True}
    r = batched.post("/completion", body).json()
    n_ctx = r["generation_settings"]["n_ctx"]  # 128, or what llama.cpp rounded it up to
    assert 128 <= n_ctx <= 512 and r["stop_type"] == "limit"
    assert r["tokens_evaluated"] + r["tokens_predicted"] == n_ctx
    too_long = batched.post("/completion", {**body, "prompt": "word " * (n_ctx + 10), "n_predict": 4})
    assert too_long.status_code == 400
    assert batched.post("/completion", {**body, "n_predict": 4}).status_code == 200


def test_return_tokens_gives_the_ids_of_the_reply(batched):
    body = {**greedy("the harbour", 12), "return_tokens": True}
    streamed = stream(batched, body)
    ids = [t for e in streamed["events"][:-1] for t in e["tokens"]]
    assert len(ids) == 12 and all(isinstance(t, int) for t in ids)
    assert batched.post("/detokenize", {"tokens": ids}).json()["content"] == streamed["text"]
    whole = batched.post("/completion", body).json()
    assert whole["tokens"] == ids and whole["content"] == streamed["text"]
    assert batched.post("/completion", greedy("the harbour", 12)).json()["tokens"] == []  # not asked: empty
    unasked = stream(batched, greedy("the harbour", 12))  # stream events carry their ids all the same
    assert [t for e in unasked["events"][:-1] for t in e["tokens"]] == ids


def test_logit_bias_bans_and_forces_tokens(batched):
    body = greedy("the sea", 6)
    plain = batched.post("/completion", {**body, "return_tokens": True}).json()
    first = plain["tokens"][0]
    banned = batched.post("/completion", {**body, "return_tokens": True, "logit_bias": [[first, False]]}).json()
    assert banned["tokens"][0] != first
    openai_form = batched.post("/v1/completions", {"prompt": body["prompt"], "max_tokens": 6, "temperature": 0,
                                                   "logit_bias": {str(first): -100}}).json()
    assert openai_form["choices"][0]["text"] != plain["content"]
    word = batched.post("/completion", {**body, "logit_bias": [["Hello", 100]]}).json()
    assert word["content"].lstrip().startswith("Hello")
    bad = batched.post("/completion", {**body, "logit_bias": [[10**9, 1]]})
    assert bad.status_code == 400 and "logit_bias" in bad.json()["error"]["message"]
