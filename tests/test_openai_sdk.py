"""The real ``openai`` Python package, sync and async, against a real router and SmolLM2 worker."""

from __future__ import annotations

import asyncio

import openai
import pytest

MODEL = "smollm2-135m-instruct"
FRANCE = [{"role": "system", "content": "Answer in one short sentence."},
          {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.url + "/v1", api_key=mesh.token, max_retries=0, timeout=120)


def test_chat_non_stream(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason == "stop"
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=16,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    *with_choices, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens > 0
    assert all(c.usage is None for c in with_choices)
    assert with_choices[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert "Paris" in text


def test_async_client_chat_and_stream(mesh):
    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=mesh.url + "/v1", api_key=mesh.token, max_retries=0) as aclient:
            whole = await aclient.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0,
                                                          max_tokens=16)
            stream = await aclient.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0,
                                                           max_tokens=16, stream=True)
            parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return whole.choices[0].message.content, "".join(parts)

    whole, streamed = asyncio.run(run())
    assert "Paris" in whole and streamed == whole


def test_completions_non_stream_and_stream(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=4)
    assert r.object == "text_completion" and r.choices[0].text and r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0,
                                            max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_is_honoured(client):
    r = client.completions.create(model=MODEL, prompt="1, 2, 3, 4, 5,", temperature=0, max_tokens=20, stop=[" 8"])
    assert " 8" not in r.choices[0].text and r.choices[0].finish_reason == "stop"


def test_seed_is_reproducible(client):
    def once() -> str:
        return client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0.8, seed=1234,
                                         max_tokens=8).choices[0].text

    assert once() == once()


def test_max_tokens_is_honoured(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Tell me a story."}],
                                       temperature=0, max_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3


def test_unknown_fields_are_accepted(client):
    r = client.chat.completions.create(model=MODEL, messages=FRANCE, temperature=0, max_tokens=2, user="u-1",
                                       metadata={"k": "v"}, extra_body={"some_future_field": 1})
    assert r.choices[0].message.content is not None


def test_n_beyond_the_bound_is_bad_request(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2, n=17)
    assert exc.value.status_code == 400 and "n" in exc.value.message


def test_bad_api_key_is_authentication_error(mesh):
    bad = openai.OpenAI(base_url=mesh.url + "/v1", api_key="not-the-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=2)


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=FRANCE, max_tokens=2)


def test_models_list(client):
    assert MODEL in [m.id for m in client.models.list()]


def test_seed_chat_route_without_v1(mesh):
    body = mesh.post("/chat/completions", {"messages": FRANCE, "temperature": 0, "max_tokens": 16}).json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant" and "Paris" in body["choices"][0]["message"]["content"]
