"""Typed job parameters and results: the one contract between the HTTP dialects and the backends.

Every dialect reads a client's body, keeps the fields the client named (checked against that API's own
rules) and builds one of the ``*Params`` below; the field defaults here are the mesh's defaults, defined
nowhere else. A dialect whose API documents other defaults (llama.cpp's ``/completion``) passes them as an
overlay once, in its own module. Backends receive these types and return the ``*Result`` types; on the
wire both travel as msgpack maps of their fields (``to_wire`` / ``params_from_wire`` / ``result_from_wire``),
and a field that one side does not know is dropped, so routers and workers of neighbouring versions
interoperate when a field is added.

Which default lives where is listed in docs/plugins.md ("Parameters and results").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar, cast

__all__ = [
    "LOGPROB_FLOOR",
    "MAX_PROBS",
    "MAX_TOKENS",
    "DetokenizeParams",
    "DetokenizeResult",
    "EmbeddingsParams",
    "EmbeddingsResult",
    "ImageParams",
    "ImageResult",
    "Params",
    "Result",
    "TemplateParams",
    "TemplateResult",
    "TextParams",
    "TextResult",
    "TokenizeParams",
    "TokenizeResult",
    "params_from_wire",
    "result_from_wire",
    "to_wire",
]

MAX_TOKENS = 32768  # the most tokens one text job may ask for (max_tokens / n_predict), in every dialect
MAX_PROBS = 100  # the most alternatives per token a job may ask log-probabilities of (TextParams.logprobs)
LOGPROB_FLOOR = -9999.0  # the log-probability of a token the sampler chain gave no chance (OpenAI's value)


def _list() -> Any:
    return dataclasses.field(default_factory=list)


def _dict() -> Any:
    return dataclasses.field(default_factory=dict)


# ---- parameters --------------------------------------------------------------------------------
@dataclasses.dataclass(kw_only=True)
class TextParams:
    """A ``completion`` or ``chat`` job. The defaults are the seed API's where it names one (max_tokens,
    temperature, top_p) and otherwise leave the distribution alone (min_p 0, no penalties)."""

    prompt: str = ""  # completion
    messages: list[dict[str, Any]] = _list()  # chat: [{"role", "content"}], content a string
    continue_final_message: bool = False  # chat: the last message is the assistant's: continue its text
    max_tokens: int = 150  # -1: until end of text or context; 0: evaluate the prompt only
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 40
    min_p: float = 0.0
    typical_p: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    mirostat: int = 0  # 0 off, 1 or 2
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    stop: list[str] = _list()
    seed: int | None = None  # None: random
    ignore_eos: bool = False
    # [[token, bias], ...]: token an id, or a string (each of its tokens); bias added to the logit, None bans
    logit_bias: list[list[Any]] = _list()
    grammar: str | None = None  # GBNF
    json_schema: dict[str, Any] | None = None
    cache_prompt: bool = True  # reuse the KV cache of a common prompt prefix (a fixed seed is reproducible
    #                            only without it)
    # Context shift (a llama-cpp model with options.context_shift): when a generation fills the context, the
    # first n_keep prompt tokens stay (-1: the whole prompt) and half of what follows them is dropped
    n_keep: int = 0
    # Token log-probabilities: None none; n >= 0 each generated token's and its n most likely alternatives'
    # (at most MAX_PROBS). Before the sampler chain (the model's distribution, as llama.cpp's n_probs), or
    # after it with post_sampling_probs (what the chain left, renormalised).
    logprobs: int | None = None
    post_sampling_probs: bool = False
    resume_text: str = ""  # text an earlier attempt already streamed (failover): continue after it


@dataclasses.dataclass(kw_only=True)
class ImageParams:
    """A ``txt2img`` or ``img2img`` job. The defaults are the seed API's (steps 20, cfg_scale 7.5, "Euler a",
    512×512), else AUTOMATIC1111's. Limits are checked by mesh/limits.py ``check_image``."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.5
    sampler_name: str = "Euler a"
    scheduler: str = "automatic"
    seed: int = -1  # -1: random (the router picks one, so that the answer can name it)
    subseed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    send_images: bool = True
    clip_skip: int = 1  # A1111's count: 1 uses the last layer of the text encoder
    eta: float | None = None  # DDIM's eta; None: the sampler's default
    # img2img
    denoising_strength: float = 0.75
    init_images: list[bytes] = _list()  # encoded images (PNG, JPEG, ...)
    mask: bytes | None = None
    inpainting_mask_invert: bool = False
    mask_blur: int = 4


@dataclasses.dataclass(kw_only=True)
class TokenizeParams:
    content: str = ""
    add_special: bool = False
    with_pieces: bool = False


@dataclasses.dataclass(kw_only=True)
class DetokenizeParams:
    tokens: list[int] = _list()


@dataclasses.dataclass(kw_only=True)
class TemplateParams:
    """``apply_template``: the chat messages to render as the model's prompt."""

    messages: list[dict[str, Any]] = _list()
    add_generation_prompt: bool = True  # end with the assistant's turn opening (llama.cpp's default)
    continue_final_message: bool = False  # the last message is the assistant's: end with its open text


@dataclasses.dataclass(kw_only=True)
class EmbeddingsParams:
    """One input to embed: ``tokens`` (ids of the model's vocabulary) when given, else ``content`` (text,
    tokenized with the model's special tokens added). Never empty: the router refuses an empty input."""

    content: str = ""
    tokens: list[int] = _list()


Params = TextParams | ImageParams | TokenizeParams | DetokenizeParams | TemplateParams | EmbeddingsParams

PARAMS_BY_OP: dict[str, type[Any]] = {
    "completion": TextParams, "chat": TextParams, "txt2img": ImageParams, "img2img": ImageParams,
    "tokenize": TokenizeParams, "detokenize": DetokenizeParams, "apply_template": TemplateParams,
    "embeddings": EmbeddingsParams,
}


# ---- results -----------------------------------------------------------------------------------
@dataclasses.dataclass(kw_only=True)
class TextResult:
    """What a ``completion`` or ``chat`` job returns. ``completion_tokens`` counts the tokens of the reply
    (the end-of-generation token that ended it is not one); ``tokens_cached`` the prompt tokens a prefix
    cache supplied instead of evaluating them."""

    text: str = ""
    finish_reason: str = "stop"  # "stop" (end of text or a stop word) or "length"
    stop_type: str = "eos"  # llama.cpp's: "eos", "word" (a stop string) or "limit"
    stopping_word: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tokens_cached: int = 0
    tokens: list[int] = _list()  # the reply's token ids, where the backend knows them (else empty)
    # With params.logprobs: one entry per token of the reply, {"id", "token" (its text), "bytes", "logprob",
    # "top": [{"id", "token", "bytes", "logprob"}, ... most likely first]} (docs/plugins.md, "Results")
    probs: list[dict[str, Any]] = _list()
    seed: int | None = None  # the seed sampling used
    truncated: bool = False  # the context filled up: generation stopped there, or went on after a context shift
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0

    @classmethod
    def timed(cls, *, text: str, finish_reason: str, stop_type: str, prompt_tokens: int, completion_tokens: int,
              prompt_ms: float, predicted_ms: float, stopping_word: str = "", seed: int | None = None,
              tokens_cached: int = 0, truncated: bool = False) -> TextResult:
        """A result with its timings rounded to microseconds."""
        return cls(text=text, finish_reason=finish_reason, stop_type=stop_type, stopping_word=stopping_word,
                   prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, tokens_cached=tokens_cached,
                   seed=seed, truncated=truncated, prompt_ms=round(prompt_ms, 3), predicted_ms=round(predicted_ms, 3))


@dataclasses.dataclass(kw_only=True)
class ImageResult:
    """What a ``txt2img`` / ``img2img`` job returns: PNG images and the parameters they were made with.
    ``seeds[i]`` / ``subseeds[i]`` belong to ``images[i]``. ``notes`` say what was changed or ignored."""

    images: list[bytes] = _list()
    seeds: list[int] = _list()
    subseeds: list[int] = _list()
    width: int = 0
    height: int = 0
    steps: int = 0
    cfg_scale: float = 0.0
    sampler_name: str = ""
    scheduler: str = "automatic"
    denoising_strength: float | None = None  # img2img
    clip_skip: int = 1
    model: str = ""
    model_hash: str | None = None
    interrupted: bool = False
    notes: list[str] = _list()
    total_s: float = 0.0


@dataclasses.dataclass(kw_only=True)
class TokenizeResult:
    tokens: list[Any] = _list()  # ids, or [{"id", "piece"}] with_pieces


@dataclasses.dataclass(kw_only=True)
class DetokenizeResult:
    content: str = ""


@dataclasses.dataclass(kw_only=True)
class TemplateResult:
    prompt: str = ""


@dataclasses.dataclass(kw_only=True)
class EmbeddingsResult:
    """One pooled, unnormalised embedding (the router normalises it as the request asks) and the number of
    tokens it was made from."""

    embedding: list[float] = _list()
    prompt_tokens: int = 0


Result = TextResult | ImageResult | TokenizeResult | DetokenizeResult | TemplateResult | EmbeddingsResult

RESULT_BY_OP: dict[str, type[Any]] = {
    "completion": TextResult, "chat": TextResult, "txt2img": ImageResult, "img2img": ImageResult,
    "tokenize": TokenizeResult, "detokenize": DetokenizeResult, "apply_template": TemplateResult,
    "embeddings": EmbeddingsResult,
}


# ---- the wire ----------------------------------------------------------------------------------
T = TypeVar("T")
_FIELDS: dict[type[Any], frozenset[str]] = {cls: frozenset(f.name for f in dataclasses.fields(cls))
                                            for cls in {*PARAMS_BY_OP.values(), *RESULT_BY_OP.values()}}


def to_wire(obj: Any) -> dict[str, Any]:
    """A params or result object as the msgpack map that carries it (its fields, shallow)."""
    return dict(vars(obj))


def build(cls: type[T], fields: Mapping[str, Any]) -> T:
    """``cls`` from a map of its fields, ignoring keys it does not have (a newer peer's fields)."""
    known = _FIELDS[cls]
    return cls(**{k: v for k, v in fields.items() if k in known})


def params_from_wire(op: str, fields: Mapping[str, Any]) -> Params:
    cls = PARAMS_BY_OP.get(op)
    if cls is None:
        raise ValueError(f"unknown operation {op!r}")
    return cast("Params", build(cls, fields))


def result_from_wire(op: str, fields: Mapping[str, Any]) -> Result:
    cls = RESULT_BY_OP.get(op)
    if cls is None:
        raise ValueError(f"unknown operation {op!r}")
    return cast("Result", build(cls, fields))
