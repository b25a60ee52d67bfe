"""Raw llama-cpp-python in one process: the same GGUF, thread count and sampling as the mesh run, no HTTP.

``python -m bench.rawllama SPEC`` (JSON: model, n_threads, n_ctx, prompt, n_predict, sampling) loads the
model and prints ``READY <json>`` (the end-of-generation tokens it bans, in place in the logits as the
llama-cpp backend does for ``ignore_eos``); then each line read on stdin runs
one generation and prints one JSON line: the time to the first token and to the last. EOF ends it. The end
to end scenario (bench/e2e.py) drives it turn about with the mesh and llama_cpp.server."""

from __future__ import annotations

import json
import sys
import time


def eog_tokens(llm) -> list[int]:
    import llama_cpp

    return [t for t in range(llm.n_vocab()) if llama_cpp.llama_token_is_eog(llm._model.vocab, t)]


def generate(llm, spec: dict, eog: list[int]) -> dict:
    s = spec["sampling"]

    def ban_eog(_ids, scores):  # what the llama-cpp backend does for ignore_eos, so both do the same work
        scores[eog] = -float("inf")
        return scores

    t0 = time.perf_counter()
    ttft = t_last = None
    tokens = 0
    ids = llm.tokenize(spec["prompt"].encode(), add_bos=True, special=True)
    for chunk in llm.create_completion(ids, max_tokens=int(spec["n_predict"]), stream=True,
                                       logits_processor=[ban_eog], temperature=s["temperature"], top_k=s["top_k"],
                                       top_p=s["top_p"], min_p=s["min_p"], repeat_penalty=s["repeat_penalty"],
                                       seed=s["seed"]):
        now = time.perf_counter()
        if chunk["choices"][0].get("text"):
            tokens += 1
            t_last = now
            if ttft is None:
                ttft = now - t0
    return {"ok": True, "ttft": ttft, "t_last": t_last - t0 if t_last else None, "tokens": tokens,
            "total": time.perf_counter() - t0}


def main(argv: list[str]) -> int:
    import llama_cpp

    spec = json.loads(argv[0])
    llm = llama_cpp.Llama(model_path=spec["model"], n_ctx=int(spec["n_ctx"]), n_threads=int(spec["n_threads"]),
                          n_batch=512, n_gpu_layers=-1, verbose=False)
    eog = eog_tokens(llm)
    print("READY " + json.dumps({"eog": eog}), flush=True)
    for _line in sys.stdin:
        print(json.dumps(generate(llm, spec, eog)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
