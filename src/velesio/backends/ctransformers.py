"""ctransformers backend: legacy GGML models (GPT-2, GPT-J, GPT-NeoX, MPT, Falcon, StarCoder, ...) on CPU.

mesh.yaml::

    models:
      - name: tiny-gpt2
        backend: ctransformers
        path: /models/tiny-gpt2.ggml.bin      # a local GGML file; never looked up on a hub
        slots: 1                               # ctransformers models are not thread-safe: jobs are serialised
        options:
          model_type: gpt2        # gpt2, gptj, gpt_neox, dolly-v2, mpt, falcon, starcoder (gpt_bigcode),
                                  # replit, llama (old GGML llama files, not GGUF)
          context_length: 2048    # families that honour it (llama, falcon, mpt...); gpt2 reads it from the file
          threads: 4              # default: ctransformers' choice (half the cores, at most 4 on small hosts)
          gpu_layers: 0           # only with a CUDA build of ctransformers
          batch_size: 32          # prompt tokens evaluated per step
          lib: avx2               # optional: avx2, avx, basic, or a path to libctransformers

Only legacy GGML files are served. GGUF files (magic ``GGUF``) are refused before loading: serve them with
the llama-cpp backend. ctransformers (0.2.27, the last release) bundles a 2023 llama.cpp that predates
the GGUF files published today.

ctransformers is imported inside ``load()`` only, so discovering this backend costs nothing.
"""

from __future__ import annotations

import codecs
import os
import random
import threading
import time
from typing import Any

from velesio.backends import (
    Backend,
    BackendError,
    Cancelled,
    ContextExceeded,
    DetokenizeParams,
    DetokenizeResult,
    InvalidRequest,
    JobContext,
    ModelConfig,
    NotSupported,
    Result,
    TextParams,
    TextResult,
    TokenizeParams,
    TokenizeResult,
)
from velesio.backends.textutil import PLAIN_CHAT_STOPS, render_plain_chat
from velesio.mesh.jobs import Job

__all__ = ["CTransformersBackend", "MODEL_TYPES", "render_chat", "CHAT_STOPS"]

# Model families ctransformers 0.2.27 can load from GGML files (its ``model_type`` values).
MODEL_TYPES = ("gpt2", "gptj", "gpt_neox", "dolly-v2", "mpt", "falcon", "starcoder", "gpt_bigcode", "replit",
               "llama")

GGUF_MAGIC = b"GGUF"
GGML_MAGICS = {b"lmgg": "ggml", b"fmgg": "ggmf", b"tjgg": "ggjt"}  # little-endian 'ggml', 'ggmf', 'ggjt'

# GGML files carry no chat template, so chat messages are rendered as "role: content" lines and the model
# continues after "assistant:" (velesio.backends.render_plain_chat). Generation also stops where the model
# starts a new turn.
CHAT_STOPS = PLAIN_CHAT_STOPS


def render_chat(messages: Any) -> str:
    """``[{"role": "user", "content": "Hi"}]`` -> ``"user: Hi\\nassistant:"`` (``render_plain_chat``'s prompt)."""
    return render_plain_chat(messages)[0]


def _hold_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


class CTransformersBackend(Backend):
    name = "ctransformers"
    kind = "text"
    operations = ("completion", "chat", "tokenize", "detokenize")

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self._llm: Any = None
        self._lock = threading.Lock()
        opts = config.options or {}
        self.model_type = opts.get("model_type")
        self.threads = int(opts.get("threads", -1) or -1)
        self.batch_size = int(opts.get("batch_size", 32) or 32)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        import importlib.util

        if importlib.util.find_spec("ctransformers") is None:
            return "ctransformers is not installed (pip install 'velesio[ctransformers]')"
        return None

    # -- loading ----------------------------------------------------------------------------------------

    def load(self) -> dict[str, Any]:
        path = self.config.path
        name = self.config.name
        if not path:
            raise BackendError(f"model '{name}': the ctransformers backend needs `path:` (a local GGML file)")
        if not os.path.isfile(path):
            raise BackendError(f"model '{name}': GGML file {path} does not exist (ctransformers serves local "
                               f"files only; download the file and point `path:` at it)")
        with open(path, "rb") as f:
            head = f.read(8)
        base = os.path.basename(path)
        if head[:4] == GGUF_MAGIC:
            version = int.from_bytes(head[4:8], "little") if len(head) == 8 else "?"
            raise BackendError(
                f"ctransformers cannot load GGUF v2/v3 files such as {base} (this one is GGUF v{version}); "
                f"serve it with the llama-cpp backend (backend: llama-cpp)")
        if not self.model_type:
            raise BackendError(f"model '{name}': set options.model_type for {base} (one of "
                               f"{', '.join(MODEL_TYPES)}); GGML files do not record their architecture")
        reason = self.unavailable_reason()
        if reason:
            raise BackendError(reason)

        from ctransformers import AutoModelForCausalLM

        opts = self.config.options or {}
        kwargs: dict[str, Any] = {"model_type": self.model_type, "local_files_only": True,
                                  "threads": self.threads, "batch_size": self.batch_size}
        for key in ("context_length", "gpu_layers", "lib", "mmap", "mlock"):
            if opts.get(key) is not None:
                kwargs[key] = opts[key]
        try:
            self._llm = AutoModelForCausalLM.from_pretrained(os.path.abspath(path), **kwargs)
        except RuntimeError as e:
            if "Failed to create LLM" in str(e):
                raise BackendError(
                    f"ctransformers could not load {base} as model_type '{self.model_type}' ({e}); check that "
                    f"it is a legacy GGML file of that family. GGUF files and architectures newer than "
                    f"ctransformers 0.2.27 are served by the llama-cpp backend (backend: llama-cpp)") from e
            raise
        llm = self._llm
        size = os.path.getsize(path)
        return {
            "n_ctx": llm.context_length,
            "size": _human_size(size),
            "file_size": size,
            "type": "completion",
            "template": None,
            "format": GGML_MAGICS.get(head[:4], "ggml"),
            "model_type": llm.model_type,
            "n_vocab": llm.vocab_size,
        }

    def close(self) -> None:
        with self._lock:
            self._llm = None

    # -- jobs -------------------------------------------------------------------------------------------

    def run(self, job: Job, ctx: JobContext) -> Result:
        if self._llm is None:
            raise BackendError(f"model '{self.config.name}' is not loaded")
        p = job.params
        if isinstance(p, TokenizeParams):
            return self._tokenize(p)
        if isinstance(p, DetokenizeParams):
            return self._detokenize(p)
        if isinstance(p, TextParams) and job.op in ("completion", "chat"):
            return self._generate(job.op, p, ctx)
        raise NotSupported(f"the ctransformers backend does not support '{job.op}'")

    def _tokenize(self, p: TokenizeParams) -> TokenizeResult:
        content = p.content
        if not isinstance(content, str):
            raise InvalidRequest("tokenize: content must be a string")
        with self._lock:
            # GGML files have no BOS marker except llama's; add_special adds it there only.
            tokens = _tokenize(self._llm, content, bool(p.add_special) and self._llm.model_type == "llama")
        return TokenizeResult(tokens=list(tokens))

    def _detokenize(self, p: DetokenizeParams) -> DetokenizeResult:
        tokens = p.tokens
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            raise InvalidRequest("detokenize: tokens must be a list of integers")
        with self._lock:
            n_vocab = self._llm.vocab_size
            bad = [t for t in tokens if not 0 <= t < n_vocab]
            if bad:
                raise InvalidRequest(f"detokenize: token ids {bad[:5]} are outside the vocabulary (0..{n_vocab - 1})")
            raw = self._llm.detokenize(tokens, decode=False) if tokens else b""
        return DetokenizeResult(content=raw.decode("utf-8", errors="replace"))

    def _generate(self, op: str, p: TextParams, ctx: JobContext) -> TextResult:
        if p.logprobs is not None:
            raise InvalidRequest(f"backend {self.name} does not report token probabilities")
        stops = [s for s in p.stop if isinstance(s, str) and s]
        prompt: Any
        if op == "chat":
            prompt, chat_stops = render_plain_chat(p.messages)
            stops += [s for s in chat_stops if s not in stops]
        else:
            prompt = p.prompt
            if isinstance(prompt, list) and all(isinstance(x, str) for x in prompt) and len(prompt) == 1:
                prompt = prompt[0]
            if not isinstance(prompt, str):
                raise InvalidRequest("completion: prompt must be a string")
        if p.grammar or p.json_schema:
            raise NotSupported("the ctransformers backend does not support grammar or json_schema")
        prompt += p.resume_text

        temperature = float(p.temperature)
        top_k = int(p.top_k or 0)
        top_p = float(p.top_p)
        if not 0.0 < top_p <= 1.0:
            top_p = 1.0
        repeat_penalty = float(p.repeat_penalty or 1.0)
        repeat_last_n = int(p.repeat_last_n)
        if repeat_last_n == 0:  # "no window": ctransformers would read [-0:] as the whole context
            repeat_penalty, repeat_last_n = 1.0, 1
        # ctransformers re-seeds its generator on every sample, so a fixed seed would draw the same random
        # number for every token: derive one seed per token from the job's seed instead.
        rng = random.Random(int(p.seed) if p.seed is not None else random.SystemRandom().randrange(2**63))
        max_tokens = int(p.max_tokens)
        ignore_eos = bool(p.ignore_eos)

        with self._lock:
            llm = self._llm
            n_vocab = llm.vocab_size
            n_ctx = llm.context_length
            if temperature <= 0.0:  # greedy
                top_k, temperature = 1, 1.0
            if top_k <= 0 or top_k > n_vocab:
                top_k = n_vocab
            tokens = _tokenize(llm, prompt, llm.model_type == "llama")
            if not tokens:  # GPT-style models need one token to start from
                tokens = [llm.bos_token_id]
            if len(tokens) > n_ctx:
                raise ContextExceeded(f"the prompt is {len(tokens)} tokens, more than the model's context of "
                                      f"{n_ctx} tokens")
            budget = n_ctx - len(tokens)
            limit = budget if max_tokens < 0 else min(max_tokens, budget)

            t0 = time.perf_counter()
            todo = llm.prepare_inputs_for_generation(tokens, reset=True)
            llm.eval(todo)
            t1 = time.perf_counter()

            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            text = ""  # everything decoded so far
            sent = 0  # how much of it was emitted
            pending: list[int] = []  # tokens not yet emitted with a chunk
            completion: list[int] = []
            max_stop = max((len(s) for s in stops), default=0)
            stop_type, stopping_word, finish = "limit", "", "length"
            last: int | None = None  # sampled but not yet evaluated

            def flush(upto: int) -> None:
                nonlocal sent
                if upto > sent:
                    ctx.emit({"text": text[sent:upto], "tokens": list(pending)})
                    pending.clear()
                    sent = upto

            while len(completion) < limit:
                if ctx.cancelled:
                    break
                if last is not None:
                    llm.eval([last])
                if ignore_eos:
                    logits = llm.logits
                    logits[len(logits) - n_vocab + llm.eos_token_id] = -1e30
                tok = llm.sample(top_k=top_k, top_p=top_p, temperature=temperature,
                                 repetition_penalty=repeat_penalty, last_n_tokens=repeat_last_n,
                                 seed=rng.randrange(2**31 - 1))
                if llm.is_eos_token(tok) and not ignore_eos:
                    stop_type, finish = "eos", "stop"
                    break
                last = tok
                completion.append(tok)
                pending.append(tok)
                before = len(text)
                text += decoder.decode(llm.detokenize([tok], decode=False))
                if stops:
                    start = max(0, before - max_stop + 1)
                    hits = [(i, s) for s in stops if (i := text.find(s, start)) >= 0]
                    if hits:
                        i, s = min(hits)
                        flush(i)
                        text = text[:i]
                        stop_type, stopping_word, finish = "word", s, "stop"
                        break
                    flush(len(text) - _hold_back(text, stops))
                else:
                    flush(len(text))

            if ctx.cancelled and not ctx.keep_partial:
                raise Cancelled("cancelled")
            if ctx.cancelled:
                stop_type, finish = "none", "stop"
            if stop_type != "word":
                text += decoder.decode(b"", final=True)
                flush(len(text))
            t2 = time.perf_counter()

        return TextResult.timed(text=text, finish_reason=finish, stop_type=stop_type, stopping_word=stopping_word,
                                prompt_tokens=len(tokens), completion_tokens=len(completion),
                                prompt_ms=(t1 - t0) * 1000.0, predicted_ms=(t2 - t1) * 1000.0)


def _tokenize(llm: Any, text: str, add_bos: bool) -> list[int]:
    """``llm.tokenize`` with an output buffer sized in bytes: ctransformers sizes it in characters, too small
    for byte-level vocabularies on non-ASCII text."""
    from ctypes import c_int

    data = text.encode("utf-8")
    buf = (c_int * (len(data) + 2))()
    n = llm.ctransformers_llm_tokenize(data, add_bos, buf)
    return list(buf[:n])


def _human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)
