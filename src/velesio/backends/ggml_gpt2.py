"""Write a tiny random-weight GPT-2 model in the legacy GGML format (ggml's ``examples/gpt-2``).

The ctransformers backend is tested on it: a real GGML file that ``ctransformers`` loads and runs,
about 190 KB, made in milliseconds, with no download. The weights are random (fixed seed), so the text is
gibberish, but it is readable gibberish: a bias trick keeps sampling on printable ASCII tokens.

Layout (all little-endian)::

    uint32 magic 0x67676d6c ("ggml")
    int32  n_vocab, n_ctx, n_embd, n_head, n_layer, ftype (0 = all f32)
    int32  n_vocab, then n_vocab x (uint32 length, bytes)     -- token texts as raw bytes
    tensors, each: int32 n_dims, int32 name length, int32 type (0 = f32),
                   int32 ne[0..n_dims) (ggml order: the fastest-varying dimension first),
                   name bytes, then the f32 data

with tensors ``model/ln_f/g``, ``model/ln_f/b``, ``model/wte`` [n_embd, n_vocab], ``model/wpe``
[n_embd, n_ctx], ``model/lm_head`` [n_embd, n_vocab] and per layer ``model/h{i}/...``: ``ln_1/g``,
``ln_1/b``, ``attn/c_attn/w`` [n_embd, 3 n_embd], ``attn/c_attn/b``, ``attn/c_proj/w`` [n_embd, n_embd],
``attn/c_proj/b``, ``ln_2/g``, ``ln_2/b``, ``mlp/c_fc/w`` [n_embd, 4 n_embd], ``mlp/c_fc/b``,
``mlp/c_proj/w`` [4 n_embd, n_embd], ``mlp/c_proj/b``.

The vocabulary is byte-level like GPT-2's once converted to GGML: the 256 single bytes (so any UTF-8 text
tokenizes and round-trips), a few whole-word tokens (no merges: ggml's tokenizer picks the longest
match), and ``<|endoftext|>`` last, which ctransformers uses as end of text.

Usage: ``python -m velesio.backends.ggml_gpt2 OUT.bin``.
"""

from __future__ import annotations

import os
import struct
import sys

GGML_MAGIC = 0x67676D6C
EOS = "<|endoftext|>"

# Whole-word tokens after the 256 bytes; with them and EOS the vocabulary has 300 entries.
WORDS = (
    " the", " and", " of", " to", " in", " a", " is", " that", " it", " for", " on", " with", " as",
    " was", " be", " by", " this", " are", " or", " from", " at", " an", " but", " not", " have", " he",
    " she", " they", " we", " you", " one", " all", " can", " hello", " world", " mesh", " model",
    " token", "ing", "ed", "er", "Hello", "The",
)


def vocab() -> list[bytes]:
    """The token texts, in id order."""
    return [bytes([b]) for b in range(256)] + [w.encode() for w in WORDS] + [EOS.encode()]


def _allowed(tok: bytes) -> bool:
    """Tokens the random model may sample: printable ASCII (and newline), not control or high bytes."""
    return all(32 <= c < 127 or c == 10 for c in tok)


def write_tiny_gpt2(path: str | os.PathLike, *, n_ctx: int = 128, n_embd: int = 32, n_head: int = 2,
                    n_layer: int = 2, seed: int = 1234, eos_bias: float = -4.0) -> str:
    """Write the tiny GPT-2 GGML file to ``path`` and return ``path`` (as a str).

    Deterministic for a given seed. Dimension 0 of the final layer norm is pinned to 1 so that column 0 of
    ``lm_head`` acts as a per-token logit bias: non-printable and high-byte tokens get -40 (never sampled),
    ``<|endoftext|>`` gets ``eos_bias`` (rare, so short completions reach their limit).
    """
    import numpy as np

    if n_embd % n_head:
        raise ValueError("n_embd must be a multiple of n_head")
    toks = vocab()
    n_vocab = len(toks)
    rng = np.random.default_rng(seed)

    def randn(*shape: int, std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    tensors: list[tuple[str, np.ndarray]] = []

    def add(name: str, arr: np.ndarray) -> None:
        tensors.append((name, np.ascontiguousarray(arr, dtype=np.float32)))

    ln_f_g = np.ones(n_embd, np.float32)
    ln_f_b = np.zeros(n_embd, np.float32)
    ln_f_g[0], ln_f_b[0] = 0.0, 1.0  # hidden[0] == 1 after the final norm: lm_head[:, 0] is a bias
    wte = randn(n_vocab, n_embd, std=0.5)
    lm_head = randn(n_vocab, n_embd, std=0.5)
    bias = np.array([0.0 if _allowed(t) else -40.0 for t in toks], np.float32)
    bias[n_vocab - 1] = eos_bias
    bias[256:n_vocab - 1] += 1.0  # words a little more likely than single letters
    lm_head[:, 0] = bias
    add("model/ln_f/g", ln_f_g)
    add("model/ln_f/b", ln_f_b)
    add("model/wte", wte)  # numpy [n_vocab, n_embd] == ggml ne [n_embd, n_vocab]
    add("model/wpe", randn(n_ctx, n_embd, std=0.1))
    add("model/lm_head", lm_head)
    for i in range(n_layer):
        p = f"model/h{i}/"
        add(p + "ln_1/g", np.ones(n_embd, np.float32))
        add(p + "ln_1/b", np.zeros(n_embd, np.float32))
        add(p + "attn/c_attn/w", randn(3 * n_embd, n_embd, std=0.2))
        add(p + "attn/c_attn/b", np.zeros(3 * n_embd, np.float32))
        add(p + "attn/c_proj/w", randn(n_embd, n_embd, std=0.2))
        add(p + "attn/c_proj/b", np.zeros(n_embd, np.float32))
        add(p + "ln_2/g", np.ones(n_embd, np.float32))
        add(p + "ln_2/b", np.zeros(n_embd, np.float32))
        add(p + "mlp/c_fc/w", randn(4 * n_embd, n_embd, std=0.2))
        add(p + "mlp/c_fc/b", np.zeros(4 * n_embd, np.float32))
        add(p + "mlp/c_proj/w", randn(n_embd, 4 * n_embd, std=0.2))
        add(p + "mlp/c_proj/b", np.zeros(n_embd, np.float32))

    path = os.fspath(path)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<I", GGML_MAGIC))
        f.write(struct.pack("<6i", n_vocab, n_ctx, n_embd, n_head, n_layer, 0))
        f.write(struct.pack("<i", n_vocab))
        for t in toks:
            f.write(struct.pack("<I", len(t)))
            f.write(t)
        for name, arr in tensors:
            dims = list(reversed(arr.shape))  # ggml order: ne[0] is the contiguous dimension
            raw = name.encode()
            f.write(struct.pack("<3i", len(dims), len(raw), 0))
            f.write(struct.pack(f"<{len(dims)}i", *dims))
            f.write(raw)
            f.write(arr.astype("<f4").tobytes())
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m velesio.backends.ggml_gpt2 OUT.bin", file=sys.stderr)
        return 2
    out = write_tiny_gpt2(argv[0])
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
