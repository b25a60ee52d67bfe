"""Embeddings out of the box: the embedded SmolLM2 serves them by default, the official ``openai`` SDK's
``client.embeddings.create`` works with its default ``encoding_format`` (base64), inputs may be token ids,
vectors are normalised as llama.cpp does (``embd_normalize``), usage counts the tokens, and an empty input
is a 400 that never reaches llama.cpp. Real router and worker processes."""

from __future__ import annotations

import base64
import math
import struct

import openai
import pytest
import requests

from conftest import SMOLLM2
from velesio.router.dialects.llamacpp import embeddings as embeddings_io

MODEL = "smollm2-135m-instruct"
WORKER = "embed-default"


@pytest.fixture(scope="module")
def router(start_router, start_worker):
    """A router with an alias for OpenAI's embedding model name, and a worker with the embedded SmolLM2
    configured as the tests' default (nothing about embeddings in its options)."""
    router = start_router({"model_aliases": {"text-embedding-3-small": MODEL}})
    router.worker = start_worker(router, WORKER, [SMOLLM2])
    return router


@pytest.fixture(scope="module")
def client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=router.token, max_retries=0, timeout=120)


def l2(vector: list[float]) -> float:
    return math.sqrt(sum(x * x for x in vector))


def backend_process(router) -> dict:
    worker = next(w for w in router.health()["workers"] if w["id"] == WORKER)
    return worker["models"][0]["backend_process"]


def test_the_embedded_model_serves_embeddings_by_default(router):
    models = {m["name"]: m for m in router.get("/models").json()["text_models"]}
    assert "embeddings" in models[MODEL]["operations"]


def test_openai_sdk_default_encoding_is_base64_and_works(router, client):
    got = client.embeddings.create(model=MODEL, input="The quick brown fox")
    vector = got.data[0].embedding
    assert len(vector) == 576 and all(isinstance(x, float) for x in vector)
    assert abs(l2(vector) - 1) < 1e-4  # llama.cpp's default: euclidean
    assert got.usage.prompt_tokens > 0 and got.usage.total_tokens == got.usage.prompt_tokens
    # what the SDK sent: base64 of little-endian float32, the same vector as the float format
    raw = router.post("/v1/embeddings", {"input": "The quick brown fox", "model": MODEL,
                                         "encoding_format": "base64"}).json()
    blob = raw["data"][0]["embedding"]
    assert isinstance(blob, str)
    decoded = struct.unpack(f"<{len(base64.b64decode(blob)) // 4}f", base64.b64decode(blob))
    floats = router.post("/v1/embeddings", {"input": "The quick brown fox", "model": MODEL,
                                            "encoding_format": "float"}).json()["data"][0]["embedding"]
    assert len(decoded) == len(floats) and max(abs(a - b) for a, b in zip(decoded, floats, strict=True)) < 1e-6
    assert max(abs(a - b) for a, b in zip(decoded, vector, strict=True)) < 1e-6


def test_openai_model_name_through_an_alias_and_several_inputs(client):
    texts = ["I believe the meaning of life is", "This is a test", "This is another test"]
    got = client.embeddings.create(model="text-embedding-3-small", input=texts)
    assert [d.index for d in got.data] == [0, 1, 2] and got.model == MODEL
    assert got.data[1].embedding != got.data[2].embedding
    singles = [client.embeddings.create(model=MODEL, input=t).usage.prompt_tokens for t in texts]
    assert got.usage.prompt_tokens == sum(singles)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-embedder", input="x")


def test_token_ids_and_lists_of_them(router, client):
    text = "hello world, how are you"
    ids = router.post("/tokenize", {"content": text}).json()["tokens"]
    by_text = router.post("/v1/embeddings", {"input": text}).json()
    by_ids = router.post("/v1/embeddings", {"input": ids}).json()
    assert by_ids["usage"]["prompt_tokens"] == by_text["usage"]["prompt_tokens"] == len(ids)
    a, b = by_text["data"][0]["embedding"], by_ids["data"][0]["embedding"]
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5
    # several token lists, and a mixed prompt (ids, then text), as llama.cpp accepts them
    many = router.post("/v1/embeddings", {"input": [ids, ids[:3], [ids[0], " world, how are you"]]}).json()
    assert len(many["data"]) == 3 and many["usage"]["prompt_tokens"] > len(ids) + 3
    # the SDK sends token lists too
    sdk = client.embeddings.create(model=MODEL, input=[ids, ids[:3]])
    assert len(sdk.data) == 2 and sdk.usage.prompt_tokens == len(ids) + 3
    # llama.cpp's /embeddings reads content the same way
    llama = router.post("/embeddings", {"content": ids}).json()
    assert max(abs(x - y) for x, y in zip(llama[0]["embedding"], a, strict=True)) < 1e-5
    r = router.post("/v1/embeddings", {"input": [ids[0], 10**9]})
    assert r.status_code == 400 and "token" in r.json()["error"]["message"]


@pytest.mark.parametrize("mode", [-1, 0, 1, 2, 3])
def test_embd_normalize_as_llama_cpp(router, mode):
    def embed(normalise: int) -> list[float]:
        body = {"input": "normalise me", "embd_normalize": normalise}
        return router.post("/v1/embeddings", body).json()["data"][0]["embedding"]

    raw, got = embed(-1), embed(mode)
    if mode == -1:
        assert abs(l2(got) - 1) > 1e-3  # not normalised
    elif mode == 0:
        assert abs(max(abs(x) for x in got) - 32760) < 1e-2
    elif mode == 1:
        assert abs(sum(abs(x) for x in got) - 1) < 1e-6
    elif mode == 2:
        assert abs(l2(got) - 1) < 1e-6
    else:
        assert abs(sum(abs(x) ** 3 for x in got) ** (1 / 3) - 1) < 1e-6
    # always the same direction as the raw vector
    scale = got[0] / raw[0]
    assert all(abs(g - r * scale) < 1e-4 * max(1.0, abs(g)) for g, r in zip(got, raw, strict=True))


def test_normalise_is_safe_for_any_p():
    vector = [30.0, -40.0, 0.0]
    assert embeddings_io.normalise(vector, 2) == pytest.approx([0.6, -0.8, 0.0])
    assert embeddings_io.normalise(vector, 1) == pytest.approx([30 / 70, -40 / 70, 0.0])
    assert embeddings_io.normalise(vector, 0) == pytest.approx([24570.0, -32760.0, 0.0])
    huge_p = embeddings_io.normalise(vector, 10**6)  # no power overflows: the max norm in the limit
    assert huge_p == pytest.approx([0.75, -1.0, 0.0], rel=1e-4)
    assert embeddings_io.normalise([0.0, 0.0], 2) == [0.0, 0.0]


@pytest.mark.parametrize("path, body", [
    ("/v1/embeddings", {"input": ""}),
    ("/v1/embeddings", {"input": ["hello", ""]}),
    ("/v1/embeddings", {"input": []}),
    ("/v1/embeddings", {"input": [[]]}),
    ("/embeddings", {"content": ""}),
    ("/embeddings", {"content": [""]}),
])
def test_empty_input_is_400_and_the_backend_stays_healthy(router, path, body):
    before = backend_process(router)
    r = router.post(path, body)
    assert r.status_code == 400, r.text
    assert "empty" in r.json()["error"]["message"]
    # the same backend process embeds and generates afterwards: nothing reached llama.cpp
    ok = router.post("/v1/embeddings", {"input": "still fine"})
    assert ok.status_code == 200 and len(ok.json()["data"][0]["embedding"]) == 576
    assert router.post("/completion", {"prompt": "Hello", "n_predict": 2}).status_code == 200
    after = backend_process(router)
    assert after["pid"] == before["pid"] and after["crashes"] == before["crashes"] == 0
    assert "malloc" not in router.worker.log and "Traceback" not in router.worker.log


def test_input_longer_than_the_context_is_400(router):
    r = router.post("/v1/embeddings", {"input": "This is a test " * 700})
    assert r.status_code == 400 and "too large" in r.json()["error"]["message"]


def test_llamacpp_and_unity_shapes(router):
    array = router.post("/embeddings", {"content": "hello"}).json()
    assert array[0]["index"] == 0 and len(array[0]["embedding"]) == 576
    v2 = requests.post(router.url + "/embeddings", json={"content": "hello"}, timeout=60,
                       headers={**router.headers, "X-Unity-Version": "6000.0.0f1"}).json()
    assert v2["embedding"] == pytest.approx(array[0]["embedding"], abs=1e-5)
    objects = router.post("/v1/embeddings", {"input": [{"prompt_string": "hello"},
                                                       {"content": [{"type": "text", "text": "hel"},
                                                                    {"type": "text", "text": "lo"}]}]}).json()
    assert objects["data"][0]["embedding"] == pytest.approx(array[0]["embedding"], abs=1e-5)
    assert objects["data"][1]["embedding"] == pytest.approx(array[0]["embedding"], abs=1e-5)
    r = router.post("/v1/embeddings", {"input": "x", "encoding_format": "int8"})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
