"""Several choices in one request, through a real router and SmolLM2 worker: OpenAI's ``n`` (chat and legacy
completions, whole and streamed, with the official SDK), a legacy completion's list of prompts, and
llama.cpp's list of prompts on /completion (an array of results, or one stream of indexed events)."""

from __future__ import annotations

import json
from collections import defaultdict

import openai
import pytest

from conftest import SMOLLM2, sse_events

MODEL = "smollm2-135m-instruct"
HELLO = [{"role": "user", "content": "Write a word."}]


@pytest.fixture(scope="module")
def router(start_router, start_worker):
    router = start_router()
    start_worker(router, "choices-1", [{**SMOLLM2, "slots": 4, "options": {"n_ctx": 512, "n_threads": 1}}])
    return router


@pytest.fixture(scope="module")
def client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=router.token, max_retries=0, timeout=120)


# ---- OpenAI n ---------------------------------------------------------------------------------------
def test_chat_n_gives_n_choices_with_one_prompt_in_usage(client):
    one = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=0)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0, seed=11, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert all(c.message.content and c.message.role == "assistant" for c in r.choices)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    again = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, temperature=1.0, seed=11, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_chat_n_usage_adds_every_choices_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0, n=2,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 10
    assert r.choices[0].message.content == r.choices[1].message.content  # greedy: the same text twice


def test_chat_n_streamed(client):
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, temperature=0, n=2,
                                            stream=True, stream_options={"include_usage": True})
    text: dict[int, str] = defaultdict(str)
    finished, usage = {}, []
    for chunk in stream:
        if chunk.usage:
            usage.append(chunk.usage)
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished[choice.index] = choice.finish_reason
    assert set(finished) == {0, 1} and text[0] and text[0] == text[1]
    assert len(usage) == 1 and usage[0].completion_tokens >= 2


def test_legacy_completion_prompts_times_n(client):
    prompts = ["The sky is", "def add(a, b):"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == [alone[0], alone[0], alone[1], alone[1]]


def test_too_many_choices_is_400(client, router):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, n=17)
    r = router.post("/v1/completions", {"prompt": ["a"] * 5, "n": 4, "max_tokens": 2})
    assert r.status_code == 400 and "n" in r.json()["error"]["message"]


# ---- llama.cpp: several prompts ----------------------------------------------------------------------
def test_llamacpp_prompt_list_gives_an_array_of_results(router):
    ids = router.post("/tokenize", {"content": "Once upon a time"}).json()["tokens"]
    prompts = ["The capital of France is", ids, [ids[0], " upon a time"]]
    body = {"n_predict": 6, "temperature": 0, "ignore_eos": True}
    r = router.post("/completion", {**body, "prompt": prompts})
    assert r.status_code == 200, r.text
    results = r.json()
    assert isinstance(results, list) and [x["index"] for x in results] == [0, 1, 2]
    for prompt, result in zip(prompts, results, strict=True):
        alone = router.post("/completion", {**body, "prompt": prompt}).json()
        assert result["content"] == alone["content"] and result["tokens_predicted"] == 6 and result["stop"]


def test_choices_of_one_prompt_evaluate_it_once(router):
    """llama.cpp's n_cmpl: choices of one long prompt go to the worker together; one evaluates the prompt,
    the others copy its KV (llama.cpp's seq_cp) and evaluate only its last token."""
    prompt = "A long list of the goods on sale at the market: " + ", ".join(f"item {i}" for i in range(60)) + "."
    r = router.post("/completion", {"prompt": prompt, "n_cmpl": 3, "n_predict": 4, "temperature": 0,
                                    "ignore_eos": True})
    assert r.status_code == 200, r.text
    results = r.json()
    n_prompt = results[0]["tokens_evaluated"]
    assert n_prompt > 200 and all(x["tokens_evaluated"] == n_prompt for x in results)
    assert sorted(x["timings"]["prompt_n"] for x in results) == [1, 1, n_prompt]  # prompt tokens evaluated
    assert len({x["content"] for x in results}) == 1


def test_llamacpp_n_cmpl_indexes_prompt_by_prompt(router):
    body = {"prompt": ["Once upon a time", "The sea"], "n_predict": 5, "temperature": 1.0, "seed": 5,
            "ignore_eos": True, "cache_prompt": False}  # evaluated afresh: a seed then reproduces exactly
    r = router.post("/completion", {**body, "n": 2})  # n is llama.cpp's alias of n_cmpl
    assert r.status_code == 200, r.text
    results = r.json()
    assert [x["index"] for x in results] == [0, 1, 2, 3]
    # prompt by prompt, each prompt's completions in turn: completion j of a prompt samples with seed + j
    for k, (prompt, seed) in enumerate([("Once upon a time", 5), ("Once upon a time", 6), ("The sea", 5),
                                        ("The sea", 6)]):
        alone = router.post("/completion", {**body, "prompt": prompt, "seed": seed}).json()
        assert results[k]["content"] == alone["content"]
    too_many = router.post("/completion", {**body, "n_cmpl": 9})
    assert too_many.status_code == 400 and "n_cmpl" in too_many.json()["error"]["message"]


def test_llamacpp_prompt_list_streams_indexed_events(router):
    r = router.post("/completion", {"prompt": ["One", "Two"], "n_predict": 4, "temperature": 0, "stream": True,
                                    "ignore_eos": True}, stream=True)
    assert r.status_code == 200
    events = [json.loads(e) for e in sse_events(r)]
    ends = [e["index"] for e in events if e["stop"]]
    assert sorted(ends) == [0, 1]
    content = {i: "".join(e["content"] for e in events if e["index"] == i) for i in (0, 1)}
    assert all(content.values())


def test_a_one_element_prompt_list_is_one_result(router):
    r = router.post("/completion", {"prompt": ["Hello"], "n_predict": 2})
    assert r.status_code == 200 and isinstance(r.json(), dict) and r.json()["index"] == 0
