"""The diffusers image backend: txt2img and img2img (with optional inpainting mask) for Stable Diffusion
1.x/2.x and SDXL checkpoints, and the embedded tiny model (see backends/tiny_sd.py and docs/images.md).

Jobs carry ``ImageParams`` (velesio.mesh.params), every default applied. The backend checks them again
against its own limits with the router's function (``check_image``, mesh/limits.py), so that it is safe to
call directly; what it checks on its own is what only it knows: the LCM schedule's length, the sampler and
scheduler names (a client may send an alias), and whether the init images and mask decode. It returns an
``ImageResult``: PNG images and the parameters they were made with (the router's A1111 dialect writes the
infotexts from them).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import importlib.util
import io
import json
import logging
import math
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

from velesio.backends import (
    Backend,
    BackendError,
    Cancelled,
    ImageParams,
    ImageResult,
    InvalidRequest,
    JobContext,
    ModelConfig,
    NotSupported,
    ParamError,
    check_image,
    image_limits,
    tiny_sd,
)
from velesio.backends import samplers as _samplers
from velesio.mesh.jobs import Job
from velesio.mesh.limits import IMAGE_LIMITS, MAX_IMAGE_SIDE, img2img_steps

from .sd_files import detect_sdxl_file, detect_sdxl_folder, model_hash

__all__ = ["DiffusersBackend", "detect_sdxl_file", "detect_sdxl_folder", "model_hash"]

log = logging.getLogger("velesio.backends.diffusers")

_LOAD_LOCK = threading.Lock()

_DTYPES = {
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32", "full": "float32",
}


class _Abort(Exception):
    """Raised inside the step callback to stop a cancelled job at once."""


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _decode_image(data: Any, what: str) -> Any:
    """PIL image from encoded image bytes (PNG, JPEG, ...); InvalidRequest naming ``what``. The size is read
    from the header and checked (``MAX_IMAGE_SIDE``) before the pixels are decoded."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, (bytearray, memoryview)):
        data = bytes(data)
    if not isinstance(data, bytes) or not data:
        raise InvalidRequest(f"{what}: not a decodable image")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size
        if not (1 <= w <= MAX_IMAGE_SIDE and 1 <= h <= MAX_IMAGE_SIDE):
            raise InvalidRequest(f"{what}: image size {w}x{h} is outside 1..{MAX_IMAGE_SIDE} pixels per side")
        img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        raise InvalidRequest(f"{what}: not a decodable image") from None
    return img


@dataclasses.dataclass
class _Request:
    """A job as this backend runs it: its params, and what the backend resolved or decoded from them."""

    op: str
    p: ImageParams
    sampler: str  # the canonical sampler name (p.sampler_name may be an alias)
    scheduler: str  # the canonical scheduler name
    seed: int  # the first image's (p.seed, or drawn when it is -1)
    subseed: int
    notes: list[str]
    init_images: list[Any] = dataclasses.field(default_factory=list)  # img2img: PIL images at the job's size
    mask: Any = None  # img2img: a PIL mask at the job's size, or None


class DiffusersBackend(Backend):
    """Stable Diffusion (1.x/2.x, SDXL) through diffusers; one pipeline per model, one job at a time."""

    name = "diffusers"
    kind = "image"
    operations = ("txt2img", "img2img")

    def __init__(self, config: ModelConfig):
        super().__init__(config)
        self._lock = threading.Lock()
        self._pipe: Any = None
        self._img2img: Any = None
        self._inpaint: Any = None
        self._inpaint_error: str | None = None
        self._base_scheduler_config: dict[str, Any] = {}
        self._torch: Any = None
        self.device = "cpu"
        self.dtype_name = "float32"
        self.limits = image_limits(None)  # the defaults, until load() reads the options
        self.threads: int | None = None  # torch CPU threads while a job runs; None: torch's default
        self._threads_fixed = False  # by the options (or the tiny model's 1): set_threads leaves it
        self.meta: dict[str, Any] = {}
        self.load_notes: list[str] = []

    # ----------------------------------------------------------------- discovery

    @classmethod
    def unavailable_reason(cls) -> str | None:
        # Cheap by contract (find_spec, no import): a broken install surfaces in load() as a model failure.
        missing = [m for m in ("torch", "diffusers", "transformers", "PIL") if importlib.util.find_spec(m) is None]
        if missing:
            return ("the diffusers backend needs " + ", ".join(missing) + ". Fix: pip install 'velesio[diffusers]' "
                    "(on a GPU host install a CUDA build of torch first, see docs/images.md)")
        return None

    @classmethod
    def embedded_models(cls) -> list[ModelConfig]:
        if cls.unavailable_reason() is not None:
            return []
        return [ModelConfig(name=tiny_sd.MODEL_NAME, backend=cls.name, path=None, slots=1,
                            options={"embedded": True})]

    # ----------------------------------------------------------------- loading

    def _pick_device(self, opts: dict[str, Any]) -> tuple[str, Any]:
        import torch

        device = str(opts.get("device") or "auto").strip().lower()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"options.device is {device!r} but torch sees no CUDA device "
                               f"(torch {torch.__version__}); install a CUDA build of torch, see docs/images.md")
        if opts.get("dtype") and str(opts["dtype"]).strip().lower() != "auto":
            key = str(opts["dtype"]).lower().replace("torch.", "")
            if key not in _DTYPES:
                raise ValueError(f"options.dtype {opts['dtype']!r}: use one of float16, bfloat16, float32")
            dtype_name = _DTYPES[key]
        else:
            dtype_name = "float16" if device.startswith("cuda") else "float32"
        return device, getattr(torch, dtype_name)

    def load(self) -> dict[str, Any]:
        with tiny_sd.quiet():
            import diffusers
            import torch
            from diffusers import StableDiffusionPipeline  # noqa: F401  (imports the pipelines quietly)
        self._torch = torch
        opts = dict(self.config.options or {})
        given: dict[str, int] = {}
        for key in IMAGE_LIMITS:
            if opts.get(key) is not None:
                given[key] = int(opts[key])
                if given[key] < 1:
                    raise ValueError(f"options.{key} must be a positive integer, got {opts[key]!r}")
        # The defaults for the rest; without max_pixel_steps, one largest image at the most steps.
        self.limits = image_limits(given)
        device, dtype = self._pick_device(opts)
        self.device, self.dtype_name = device, str(dtype).replace("torch.", "")
        tiny_sd.disable_progress_bars()

        path = self.config.path
        embedded = not path or _truthy(opts.get("embedded"))
        local_only = _truthy(opts.get("local_files_only", os.environ.get("HF_HUB_OFFLINE", "")))
        common: dict[str, Any] = {"torch_dtype": dtype}
        if opts.get("variant"):
            common["variant"] = str(opts["variant"])
        wanted = str(opts.get("pipeline") or "").lower()
        if opts.get("threads"):
            self.threads, self._threads_fixed = max(1, int(opts["threads"])), True
        elif embedded and device == "cpu":
            # The tiny model is too small to gain from intra-op threads, and torch's spinning worker threads
            # slow it down many times over on a busy host.
            self.threads, self._threads_fixed = 1, True
        else:
            # The worker's share of the host's cores (a set_threads during loading already set it).
            self.threads = self.threads or self.config.threads
        t0 = time.perf_counter()
        # Building pipelines is not thread-safe (meta-tensor initialisation), and a worker loads its models
        # in parallel threads: one pipeline at a time.
        with _LOAD_LOCK, tiny_sd.quiet():
            if embedded or not path:
                source = tiny_sd.ensure(opts.get("cache_dir"))
                pipe = tiny_sd.load(opts.get("cache_dir"), torch_dtype=dtype)
                sdxl = False
            else:
                source = Path(path).expanduser()
                if not source.exists():
                    raise FileNotFoundError(f"model path {str(source)!r} does not exist")
                if source.is_dir():
                    sdxl = wanted == "sdxl" or (wanted != "sd" and detect_sdxl_folder(source))
                    pipe = self._load_folder(diffusers, source, sdxl, common)
                else:
                    if source.suffix.lower() not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
                        raise ValueError(f"{source.name}: expected a diffusers folder or a .safetensors/.ckpt file")
                    sdxl = wanted == "sdxl" or (wanted != "sd" and detect_sdxl_file(source))
                    cls = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
                    single: dict[str, Any] = {"local_files_only": local_only}
                    for key in ("config", "original_config"):
                        if opts.get(key):
                            single[key] = str(opts[key])
                    if not sdxl:
                        single.update(safety_checker=None, requires_safety_checker=False)
                    pipe = cls.from_single_file(str(source), **single, **common)
            pipe.set_progress_bar_config(disable=True)
            if _truthy(opts.get("cpu_offload")) and device.startswith("cuda"):
                pipe.enable_model_cpu_offload()
            else:
                pipe.to(device)
            if _truthy(opts.get("attention_slicing")):
                pipe.enable_attention_slicing()
            if _truthy(opts.get("vae_tiling")) and hasattr(pipe, "enable_vae_tiling"):
                pipe.enable_vae_tiling()
            self._pipe = pipe
            self._img2img = self._derive(diffusers.AutoPipelineForImage2Image, "img2img")
        self._base_scheduler_config = dict(pipe.scheduler.config)
        load_s = time.perf_counter() - t0

        digest = model_hash(source)
        filename = str(source)
        stem = tiny_sd.MODEL_NAME if embedded else source.name
        vae_scale = int(getattr(pipe, "vae_scale_factor", 8) or 8)
        sample = int(getattr(pipe.unet.config, "sample_size", 64) or 64) * vae_scale
        self.meta = {
            **{k: v for k, v in self.limits.items()},
            # A1111-shaped entries ({name, aliases, options} / {name, label, aliases, ...}): the router lists
            # them and resolves a client's sampler or scheduler name against them.
            "samplers": copy.deepcopy(_samplers.SAMPLERS),
            "schedulers": copy.deepcopy(_samplers.SCHEDULERS),
            "type": "checkpoint",
            "title": f"{stem} [{digest}]",
            "model_name": self.config.name,
            "hash": digest,
            "filename": filename,
            "pipeline": type(pipe).__name__,
            "sdxl": bool(sdxl),
            "embedded": bool(embedded),
            "device": self._device_label(),
            "dtype": self.dtype_name,
            "default_width": sample,
            "default_height": sample,
            "load_s": round(load_s, 3),
            "threads": self.threads or self._torch.get_num_threads(),
        }
        if embedded:
            self.meta["note"] = "embedded tiny model with random weights: it makes noise, not pictures"
        if self.load_notes:
            self.meta["notes"] = list(self.load_notes)
        return dict(self.meta)

    def _load_folder(self, diffusers: Any, folder: Path, sdxl: bool, common: dict[str, Any]) -> Any:
        if sdxl:
            return diffusers.StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, **common)
        try:
            index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise ValueError(f"{folder}: not a diffusers model folder (no readable model_index.json)") from None
        cls_name = str(index.get("_class_name", ""))
        if cls_name in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline",
                        "StableDiffusionInpaintPipeline", ""):
            return diffusers.StableDiffusionPipeline.from_pretrained(
                folder, local_files_only=True, safety_checker=None, feature_extractor=None,
                requires_safety_checker=False, **common)
        self.load_notes.append(f"{cls_name}: loaded through AutoPipelineForText2Image (not tested by velesio)")
        return diffusers.AutoPipelineForText2Image.from_pretrained(folder, local_files_only=True, **common)

    def _derive(self, auto_cls: Any, what: str) -> Any:
        """A pipeline for another task sharing the loaded components (no second copy of the weights)."""
        pipe = auto_cls.from_pipe(self._pipe)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _inpaint_pipe(self) -> Any:
        if self._inpaint is None and self._inpaint_error is None:
            try:
                import diffusers

                with tiny_sd.quiet():
                    self._inpaint = self._derive(diffusers.AutoPipelineForInpainting, "inpaint")
            except Exception as exc:  # pragma: no cover - depends on the pipeline class
                self._inpaint_error = f"{type(exc).__name__}: {exc}"
        return self._inpaint

    def _device_label(self) -> str:
        torch = self._torch
        if self.device.startswith("cuda") and torch is not None and torch.cuda.is_available():
            index = torch.device(self.device).index or 0
            return f"cuda:{index} {torch.cuda.get_device_name(index)}"
        return self.device

    def set_threads(self, n: int) -> None:
        # From the next job on: run() sets torch's count as a job starts, and a running job keeps its own.
        if not self._threads_fixed:
            self.threads = max(1, int(n))

    def close(self) -> None:
        with self._lock:
            self._pipe = self._img2img = self._inpaint = None
        gc.collect()
        torch = self._torch
        if torch is not None and torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------- requests

    def _schedule_cap(self, sampler: str) -> int:
        """The longest noise schedule a job may use: max_steps, and for LCM its distillation schedule's length."""
        if sampler == "LCM":
            original = int(self._base_scheduler_config.get("original_inference_steps") or 50)  # LCMScheduler's default
            return min(self.limits["max_steps"], original)
        return self.limits["max_steps"]

    def _parse(self, job: Job) -> _Request:
        p = job.params
        if not isinstance(p, ImageParams):
            raise InvalidRequest(f"{job.op}: expected image parameters, got {type(p).__name__}")
        try:
            check_image(job.op, p, self.limits, self.config.name)
        except ParamError as err:
            raise InvalidRequest(str(err)) from None
        sampler = _samplers.resolve_sampler(p.sampler_name)
        if sampler is None:
            raise InvalidRequest(f"unknown sampler {p.sampler_name!r}; valid: {', '.join(_samplers.sampler_names())}")
        schedule = _samplers.resolve_scheduler(p.scheduler)
        if schedule is None:
            raise InvalidRequest(f"unknown scheduler {p.scheduler!r}; valid: "
                                 f"{', '.join(s['name'] for s in _samplers.SCHEDULERS)}")
        if p.steps > self._schedule_cap(sampler):
            # diffusers' LCMScheduler raises a ValueError mid-job beyond its distillation schedule
            raise InvalidRequest(f"steps: sampler {sampler} runs at most {self._schedule_cap(sampler)} steps, "
                                 f"got {p.steps}")
        seed = p.seed if p.seed >= 0 else random.randrange(2**32)
        subseed = p.subseed if p.subseed >= 0 else random.randrange(2**32)
        req = _Request(op=job.op, p=p, sampler=sampler, scheduler=schedule, seed=seed, subseed=subseed, notes=[])
        if job.op == "img2img":
            size = (p.width, p.height)
            for k, data in enumerate(p.init_images):
                img = _decode_image(data, f"init_images[{k}]").convert("RGB")
                req.init_images.append(img if img.size == size else img.resize(size, _lanczos()))
            if p.mask:
                from PIL import ImageFilter, ImageOps

                mask = _decode_image(p.mask, "mask").convert("L")
                if mask.size != size:
                    mask = mask.resize(size, _lanczos())
                if p.inpainting_mask_invert:
                    mask = ImageOps.invert(mask)
                if p.mask_blur > 0:
                    mask = mask.filter(ImageFilter.GaussianBlur(p.mask_blur))
                req.mask = mask
        return req

    def run(self, job: Job, ctx: JobContext) -> ImageResult:
        if job.op not in self.operations:
            raise NotSupported(f"the diffusers backend does not do {job.op!r}")
        if self._pipe is None:
            raise BackendError("model is not loaded")
        req = self._parse(job)
        with self._lock:
            if self._pipe is None:
                raise BackendError("model was closed")
            if not self.threads:
                return self._generate(req, ctx)
            torch = self._torch
            previous = torch.get_num_threads()
            torch.set_num_threads(self.threads)  # process-wide: set for this job and put back after
            try:
                return self._generate(req, ctx)
            finally:
                torch.set_num_threads(previous)

    def _generate(self, req: _Request, ctx: JobContext) -> ImageResult:
        torch = self._torch
        t0 = time.perf_counter()
        p = req.p
        notes = req.notes
        op = req.op
        batch, n_iter = p.batch_size, p.n_iter
        total = batch * n_iter
        steps = p.steps
        pipe = self._pipe
        call: dict[str, Any] = {
            "num_inference_steps": steps,
            "guidance_scale": float(p.cfg_scale),
            "output_type": "pil",
        }
        if p.clip_skip > 1:
            clip_skip = int(p.clip_skip)  # A1111 counts the last layer as 1; diffusers counts skipped ones
            layers = getattr(getattr(getattr(pipe, "text_encoder", None), "config", None), "num_hidden_layers", 0)
            if clip_skip > 1 and layers and clip_skip > layers:
                # diffusers would index past the encoder's hidden states (an IndexError mid-job)
                notes.append(f"clip_skip {clip_skip} is more than the text encoder's {layers} layers; ignored")
            elif clip_skip > 1 and hasattr(getattr(pipe, "text_encoder", None), "text_model"):
                call["clip_skip"] = clip_skip - 1
            elif clip_skip > 1:
                # diffusers' clip_skip reads text_encoder.text_model, which newer transformers' CLIP lacks.
                notes.append(f"clip_skip {clip_skip} is not supported with this transformers version; ignored")
        if p.eta is not None and req.sampler == "DDIM":
            call["eta"] = float(p.eta)
        effective = steps
        if op == "img2img":
            strength = float(p.denoising_strength)
            if strength <= 0:
                notes.append("denoising_strength 0: returned the init images unchanged")
                images: list[Any] = [req.init_images[i % len(req.init_images)] for i in range(total)]
                return self._result(req, images, list(range(total)), False, t0)
            if req.mask is not None:
                inpaint = self._inpaint_pipe()
                if inpaint is not None:
                    pipe = inpaint
                    call["mask_image"] = None  # filled per batch below
                else:
                    notes.append(f"mask ignored: no inpainting pipeline for this model ({self._inpaint_error})")
                    pipe = self._img2img
            else:
                pipe = self._img2img
            # diffusers runs the last int(n × strength) steps of an n-step schedule; a longer schedule makes one
            # step of a small strength run, but its length is bounded by max_steps (mesh/limits.py).
            n, effective = img2img_steps(steps, strength, self._schedule_cap(req.sampler))
            call["num_inference_steps"] = n
            call["strength"] = strength
            if int(n * strength) != effective:
                # Below 1 / max_steps: one step of the max_steps schedule, the least noise it allows
                # (any strength in [1/n, 2/n) runs that one step; the middle is safe from float rounding).
                call["strength"] = (effective + 0.5) / n
                notes.append(f"denoising_strength {strength:g} is below this model's smallest effective strength "
                             f"1/{n}: used {n} steps, of which 1 runs, as at 1/{n}")
            elif n != steps:
                notes.append(f"denoising_strength {strength:g} with {steps} steps runs no step; used {n} steps, "
                             "of which 1 runs")
            if "mask_image" in call:
                call.update(width=p.width, height=p.height)
        else:
            call.update(width=p.width, height=p.height)

        images = []
        image_index: list[int] = []
        interrupted = False
        for it in range(n_iter):
            first = it * batch
            if ctx.cancelled:
                if ctx.keep_partial:
                    interrupted = True
                    break
                raise Cancelled("cancelled")
            gens = [torch.Generator(device="cpu").manual_seed(req.seed + first + j) for j in range(batch)]
            scheduler_notes: list[str] = []
            with tiny_sd.quiet():
                pipe.scheduler = _samplers.make_scheduler(req.sampler, req.scheduler, self._base_scheduler_config,
                                                          scheduler_notes)
            for note in scheduler_notes:
                if note not in notes:
                    notes.append(note)
            done = [0]

            def on_step(p: Any, i: int, t: Any, kwargs: dict[str, Any], _first: int = first,
                        _done: list[int] = done) -> dict[str, Any]:
                n_ts = max(1, int(getattr(p, "num_timesteps", 0) or effective))
                step = min(effective, math.ceil((i + 1) * effective / n_ts))
                if step > _done[0]:
                    _done[0] = step
                    ctx.progress(step, effective, image=_first, images=total)
                if ctx.cancelled:
                    if ctx.keep_partial:
                        p._interrupt = True
                    else:
                        raise _Abort()
                return {}

            args = dict(call)
            args["prompt"] = [p.prompt] * batch
            args["negative_prompt"] = [p.negative_prompt] * batch
            args["generator"] = gens
            args["callback_on_step_end"] = on_step
            if op == "img2img":
                inits = req.init_images
                args["image"] = [inits[(first + j) % len(inits)] for j in range(batch)]
                if "mask_image" in args:
                    args["mask_image"] = [req.mask] * batch
            try:
                with tiny_sd.quiet(), torch.inference_mode():
                    out = pipe(**args)
            except _Abort:
                raise Cancelled("cancelled") from None
            if ctx.cancelled and done[0] < effective:
                if not ctx.keep_partial:
                    raise Cancelled("cancelled")
                interrupted = True
                notes.append(f"interrupted at step {done[0]} of {effective}; the last batch is partly denoised")
                images.extend(out.images)
                image_index.extend(range(first, first + len(out.images)))
                break
            images.extend(out.images)
            image_index.extend(range(first, first + len(out.images)))
        return self._result(req, images, image_index, interrupted, t0)

    def _result(self, req: _Request, images: list[Any], index: list[int], interrupted: bool,
                t0: float) -> ImageResult:
        """The job's result: ``images[i]`` (PNG; none unless ``send_images``) was made with seed ``seed + index[i]``."""
        p = req.p
        blobs: list[bytes] = []
        if p.send_images:
            for img in images:
                buf = io.BytesIO()
                img.save(buf, format="PNG")
                blobs.append(buf.getvalue())
        return ImageResult(
            images=blobs, seeds=[req.seed + i for i in index], subseeds=[req.subseed + i for i in index],
            width=p.width, height=p.height, steps=p.steps, cfg_scale=float(p.cfg_scale), sampler_name=req.sampler,
            scheduler=req.scheduler, denoising_strength=float(p.denoising_strength) if req.op == "img2img" else None,
            clip_skip=p.clip_skip, model=self.config.name, model_hash=self.meta.get("hash"), interrupted=interrupted,
            notes=req.notes, total_s=round(time.perf_counter() - t0, 4))


def _lanczos() -> Any:
    from PIL import Image

    return getattr(Image, "Resampling", Image).LANCZOS
