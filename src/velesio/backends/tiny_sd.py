"""The embedded image model: a tiny Stable Diffusion pipeline with random weights, built locally.

It needs no download and no network. It is built once (a few seconds on a CPU), written to a cache folder
in the ordinary diffusers layout, and from then on loaded through ``StableDiffusionPipeline.from_pretrained``
like any real model, so the embedded model exercises the same loading and generation code.

The weights are random (drawn from a fixed seed, so every host builds the same model): the pipeline makes
noise-like pictures, not images of the prompt. It exists so that a worker serves txt2img and img2img out
of the box and the whole image path can be tested on small machines.

Cache folder: ``$VELESIO_CACHE/tiny-sd`` or ``~/.cache/velesio/tiny-sd``; the build goes into a temporary
folder beside it and is renamed into place, so workers starting together never see a half-written model.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Literal

__all__ = ["BUILD_VERSION", "MODEL_NAME", "SEED", "cache_root", "default_dir", "build", "ensure"]

MODEL_NAME = "tiny-sd"
BUILD_VERSION = "2"  # bump when the architecture below changes; a new folder is built beside the old one
SEED = 20240501
MARKER = "velesio-tiny-sd.json"

# Architecture. The VAE has four blocks so that its latent is 1/8 of the image side, as in real SD 1.x:
# a 512x512 request costs a 64x64 latent, not a 256x256 one.
UNET: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "sample_size": 8,  # latent side; 8 x 8 (vae scale) = 64 px default
    "in_channels": 4,
    "out_channels": 4,
    # The prompt enters through the cross-attention of the mid block only (UNetMidBlock2DCrossAttn): the
    # same code path as a real model, at a quarter of the cost of cross-attention in the outer blocks too.
    "down_block_types": ("DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D"),
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
VAE: dict[str, Any] = {
    "block_out_channels": (32, 32, 64, 64),
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "latent_channels": 4,
    "layers_per_block": 1,
    "norm_num_groups": 32,
    "sample_size": 64,
}
TEXT: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "projection_dim": 32,
    "layer_norm_eps": 1e-5,
    "hidden_act": "quick_gelu",
}
SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
# A few merges so that common letter pairs become single tokens, as in a real CLIP vocabulary.
MERGES = ["t h", "th e</w>", "a n", "i n", "e r", "o n</w>", "a r", "e n"]
BOS, EOS = "<|startoftext|>", "<|endoftext|>"

_BUILD_LOCK = threading.Lock()


def cache_root() -> Path:
    """``$VELESIO_CACHE`` or ``~/.cache/velesio``."""
    env = os.environ.get("VELESIO_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "velesio"


def default_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Folder of the built model: ``<cache_dir or cache_root()/tiny-sd>/v<BUILD_VERSION>``."""
    base = Path(cache_dir).expanduser() if cache_dir else cache_root() / MODEL_NAME
    return base / f"v{BUILD_VERSION}"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: every byte maps to a printable character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def vocabulary() -> dict[str, int]:
    """The CLIP-style vocabulary: 256 byte characters, the same with ``</w>``, the merges, BOS, EOS."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in MERGES] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}


def write_tokenizer(folder: str | os.PathLike) -> Path:
    """Write vocab.json, merges.txt and tokenizer_config.json of the tiny CLIP tokenizer into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocabulary(), ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": TEXT["max_position_embeddings"],
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


_QUIET_LOCK = threading.Lock()
_quiet_depth = 0
_quiet_saved: list[Any] = []
_NOISY_MODULES = r"(diffusers|transformers|huggingface_hub|accelerate|torch|numpy)(\..*)?$"
_NOISY_FILTERS: list[tuple[Literal["ignore"], str | None, type[Warning], str]] = [
    ("ignore", None, FutureWarning, _NOISY_MODULES),
    ("ignore", None, DeprecationWarning, _NOISY_MODULES),
    ("ignore", ".*safety[ _]checker.*", Warning, ""),
    ("ignore", ".*torch_dtype.*", Warning, ""),
    ("ignore", ".*CLIPFeatureExtractor.*", Warning, ""),
    ("ignore", ".*upcast_vae.*", Warning, ""),
]


@contextlib.contextmanager
def quiet() -> Any:
    """Silence the known, harmless warnings of diffusers/transformers while the enclosed block runs.

    Python warnings of those libraries (deprecations, safety-checker and dtype notices) are filtered, and the
    two libraries' loggers raised to ERROR; both are put back when the last thread inside leaves (the
    worker loads and runs models in several threads, so this is reference-counted, not nested state).
    """
    global _quiet_depth
    with _QUIET_LOCK:
        if _quiet_depth == 0:
            for module in ("diffusers.utils.logging", "transformers.utils.logging"):
                try:  # let each library set up its root logger now, or it would reset the level set below
                    __import__(module, fromlist=["get_verbosity"]).get_verbosity()
                except Exception:  # pragma: no cover - library missing or too old
                    pass
            loggers = [logging.getLogger(name) for name in ("diffusers", "transformers")]
            _quiet_saved[:] = [(lg, lg.level) for lg in loggers]
            for lg in loggers:
                lg.setLevel(max(lg.getEffectiveLevel(), logging.ERROR))
            for action, message, category, module in _NOISY_FILTERS:
                warnings.filterwarnings(action, message=message or "", category=category, module=module)
                _quiet_saved.append(warnings.filters[0])  # the entry just inserted
        _quiet_depth += 1
    try:
        yield
    finally:
        with _QUIET_LOCK:
            _quiet_depth -= 1
            if _quiet_depth == 0:
                for item in _quiet_saved:
                    if isinstance(item[0], logging.Logger):
                        item[0].setLevel(item[1])
                    elif item in warnings.filters:
                        # A list at run time (filterwarnings inserts into it); typeshed declares a Sequence.
                        warnings.filters.remove(item)  # type: ignore[attr-defined]
                _quiet_saved.clear()
                getattr(warnings, "_filters_mutated", lambda: None)()


def disable_progress_bars() -> None:
    """Turn off the tqdm bars of diffusers and transformers (loading, saving, denoising) in this process:
    a worker has no terminal to draw them on."""
    for module in ("diffusers.utils.logging", "transformers.utils.logging"):
        try:
            __import__(module, fromlist=["disable_progress_bar"]).disable_progress_bar()
        except Exception:  # pragma: no cover - library too old or missing
            pass


def build_pipeline() -> Any:
    """The tiny pipeline in memory, with weights drawn from :data:`SEED`."""
    with quiet():
        import torch
        from diffusers import (
            AutoencoderKL,
            EulerAncestralDiscreteScheduler,
            StableDiffusionPipeline,
            UNet2DConditionModel,
        )
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    # Module constructors draw from torch's global generator: one build at a time in this process, so that
    # two threads building at once still get the seeded weights.
    with _BUILD_LOCK, quiet(), tempfile.TemporaryDirectory(prefix="velesio-tok-") as tok_dir:
        write_tokenizer(tok_dir)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True)
        vocab = vocabulary()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            unet = UNet2DConditionModel(**UNET)
            torch.manual_seed(SEED + 1)
            vae = AutoencoderKL(**VAE)
            torch.manual_seed(SEED + 2)
            text_encoder = CLIPTextModel(CLIPTextConfig(
                vocab_size=len(vocab), bos_token_id=vocab[BOS], eos_token_id=vocab[EOS],
                pad_token_id=vocab[EOS], **TEXT))
        scheduler = EulerAncestralDiscreteScheduler(**SCHEDULER)
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return pipe


def is_built(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return (folder / "model_index.json").is_file() and (folder / MARKER).is_file()


def build(target: str | os.PathLike) -> Path:
    """Build the tiny pipeline into ``target`` (which must not exist yet), atomically.

    Returns ``target``. When another process finished the same build first, its folder is kept and ours is
    thrown away.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
    disable_progress_bars()
    try:
        pipe = build_pipeline()
        with quiet():
            pipe.save_pretrained(tmp, safe_serialization=True)
        # transformers 5 saves only tokenizer.json; keep the source files too, so that transformers 4 (whose
        # CLIPTokenizer reads vocab.json and merges.txt) loads the same cache
        tok_dir = tmp / "tokenizer"
        for name in ("vocab.json", "merges.txt"):
            if not (tok_dir / name).exists():
                src = Path(write_tokenizer(tmp / ".tok")) / name
                shutil.copyfile(src, tok_dir / name)
        shutil.rmtree(tmp / ".tok", ignore_errors=True)
        (tmp / MARKER).write_text(json.dumps({
            "name": MODEL_NAME, "build_version": BUILD_VERSION, "seed": SEED,
            "note": "random weights: this model makes noise, not pictures of the prompt",
        }, indent=2), encoding="utf-8")
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_built(target):
                raise
        return target
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder of the built tiny model, building it first when it is missing or incomplete."""
    target = default_dir(cache_dir)
    if is_built(target):
        return target
    if target.exists():  # a leftover that is not a finished build (renamed folders are always complete)
        shutil.rmtree(target, ignore_errors=True)
    return build(target)


def load(cache_dir: str | os.PathLike | None = None, **kwargs: Any) -> Any:
    """Build if needed, then load the tiny pipeline with ``StableDiffusionPipeline.from_pretrained``."""
    folder = ensure(cache_dir)
    disable_progress_bars()
    with quiet():
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline.from_pretrained(
            folder, local_files_only=True, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False, **kwargs)
