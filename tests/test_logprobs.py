"""Token log-probabilities through a real router and SmolLM2 worker: llama.cpp's ``n_probs`` (whole, streamed,
after the sampler chain) and OpenAI's ``logprobs`` on chat and legacy completions, read with the official
``openai`` SDK."""

from __future__ import annotations

import json
import math

import openai
import pytest

from conftest import SMOLLM2, sse_events

MODEL = "smollm2-135m-instruct"
PROMPT = "I believe the meaning of life is"


@pytest.fixture(scope="module")
def router(start_router, start_worker):
    router = start_router()
    start_worker(router, "logprobs-1", [{**SMOLLM2, "options": {"n_ctx": 512, "n_threads": 1}}])
    return router


@pytest.fixture(scope="module")
def client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=router.token, max_retries=0, timeout=120)


def check_alternatives(tokens: list[dict], n: int) -> None:
    for tok in tokens:
        assert isinstance(tok["id"], int) and isinstance(tok["token"], str)
        assert tok["bytes"] == list(tok["token"].encode()) or "\ufffd" in tok["token"]
        assert tok["logprob"] <= 0.0
        top = tok["top_logprobs"]
        assert len(top) == n
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True) and all(v <= 0.0 for v in values)


# ---- llama.cpp ----------------------------------------------------------------------------------------
def test_n_probs_on_completion(router):
    r = router.post("/completion", {"prompt": PROMPT, "n_probs": 10, "temperature": 0.0, "n_predict": 5,
                                    "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    probs = body["completion_probabilities"]
    assert len(probs) == 5 == body["tokens_predicted"]
    check_alternatives(probs, 10)
    assert "".join(p["token"] for p in probs) == body["content"]
    for tok in probs:  # greedy: the sampled token is the most likely one
        assert tok["id"] == tok["top_logprobs"][0]["id"]
        assert tok["logprob"] == pytest.approx(tok["top_logprobs"][0]["logprob"])
    assert body["generation_settings"]["n_probs"] == 10


def test_n_probs_streamed_one_token_per_event(router):
    r = router.post("/completion", {"prompt": PROMPT, "n_probs": 3, "temperature": 0.0, "n_predict": 5,
                                    "ignore_eos": True, "stream": True}, stream=True)
    assert r.status_code == 200
    events = [json.loads(e) for e in sse_events(r)]
    partials = [e for e in events if not e["stop"]]
    assert partials and "completion_probabilities" not in events[-1]
    seen = [p for e in partials for p in e["completion_probabilities"]]
    assert len(seen) == 5
    check_alternatives(seen, 3)
    for event in partials:
        assert "".join(p["token"] for p in event["completion_probabilities"]) == event["content"]


def test_post_sampling_probs_are_probabilities_of_what_was_left(router):
    r = router.post("/completion", {"prompt": "Today was the day. Today I would finally become a", "n_probs": 10,
                                    "temperature": 1.0, "n_predict": 5, "post_sampling_probs": True,
                                    "ignore_eos": True, "seed": 3})
    assert r.status_code == 200, r.text
    probs = r.json()["completion_probabilities"]
    assert len(probs) == 5
    for tok in probs:
        assert "logprob" not in tok and 0.0 < tok["prob"] <= 1.0
        top = tok["top_probs"]
        assert 1 <= len(top) <= 10 and all(0.0 < t["prob"] <= 1.0 for t in top)
        assert tok["id"] in [t["id"] for t in top]
        if len(top) < 10:  # fewer than asked only when the chain left fewer: they are all there is
            assert sum(t["prob"] for t in top) == pytest.approx(1.0, abs=1e-3)


def test_n_probs_out_of_range_is_400(router):
    r = router.post("/completion", {"prompt": PROMPT, "n_probs": 10_000, "n_predict": 2})
    assert r.status_code == 400 and "n_probs" in r.json()["error"]["message"]
    r = router.post("/completion", {"prompt": PROMPT, "n_probs": -1, "n_predict": 2})  # llama.cpp: none
    assert r.status_code == 200 and "completion_probabilities" not in r.json()


# ---- OpenAI -------------------------------------------------------------------------------------------
def test_chat_logprobs_with_the_openai_sdk(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Capital of France?"}],
                                       max_tokens=6, temperature=0, logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    assert content and len(content) == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for tok in content:
        assert tok.logprob <= 0 and len(tok.top_logprobs) == 4
        assert tok.top_logprobs[0].token == tok.token
        assert bytes(tok.bytes).decode(errors="replace") == tok.token


def test_chat_logprobs_streamed(client):
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hello."}],
                                            max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                                            stream=True)
    text, tokens = "", []
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            if choice.logprobs and choice.logprobs.content:
                tokens += choice.logprobs.content
    assert tokens and "".join(t.token for t in tokens) == text
    assert all(len(t.top_logprobs) == 2 for t in tokens)


def test_chat_without_logprobs_has_none(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert r.choices[0].logprobs is None


def test_top_logprobs_needs_logprobs(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       top_logprobs=3)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       logprobs=True, top_logprobs=21)


def test_legacy_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert value <= 0 and 1 <= len(top) <= 3
        assert max(top.values()) == pytest.approx(value) and token in top  # greedy
        assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-6
