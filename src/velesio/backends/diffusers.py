"""The diffusers image backend: txt2img and img2img (with optional inpainting mask) for Stable Diffusion
1.x/2.x and SDXL checkpoints, and the embedded tiny model (see backends/tiny_sd.py and docs/images.md).

Job params arrive validated and normalised by the router (A1111 names): prompt, negative_prompt, width,
height, steps, cfg_scale, sampler_name, scheduler, seed, subseed, batch_size, n_iter, denoising_strength,
init_images (image bytes), mask (image bytes or None), send_images. The backend checks them again, cheaply,
so that it is safe to call directly.
"""

from __future__ import annotations

import base64
import binascii
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
    InvalidRequest,
    JobContext,
    ModelConfig,
    NotSupported,
    tiny_sd,
)
from velesio.backends import samplers as _samplers
from velesio.mesh.jobs import IMAGE_LIMITS, Job, image_cost, img2img_steps

from .sd_files import detect_sdxl_file, detect_sdxl_folder, model_hash

__all__ = ["DiffusersBackend", "detect_sdxl_file", "detect_sdxl_folder", "model_hash"]

log = logging.getLogger("velesio.backends.diffusers")

_LOAD_LOCK = threading.Lock()

_DTYPES = {
    "float16": "float16", "fp16": "float16", "half": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float32": "float32", "fp32": "float32", "float": "float32", "full": "float32",
}

# Bounds on the request numbers that size work outside IMAGE_LIMITS (the router's A1111 dialect has the same).
MAX_INIT_IMAGES = 64
MAX_IMAGE_SIDE = 8192  # an init image or mask, checked from its header before it is decoded
MAX_MASK_BLUR = 256
MAX_CLIP_SKIP = 12
MAX_ETA = 10.0


class _Abort(Exception):
    """Raised inside the step callback to stop a cancelled job at once."""


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def _decode_image(data: Any, what: str) -> Any:
    """PIL image from bytes (or a base64 string, data URL allowed); InvalidRequest naming ``what``."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(data, str):
        text = data.split(",", 1)[1] if data.startswith("data:") and "," in data else data
        try:
            data = base64.b64decode(text, validate=False)
        except (binascii.Error, ValueError):
            raise InvalidRequest(f"{what}: not a decodable image") from None
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


def _as_int(params: dict[str, Any], key: str, default: int) -> int:
    value = params.get(key)
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{key}: expected an integer, got {value!r}") from None


def _as_float(params: dict[str, Any], key: str, default: float) -> float:
    value = params.get(key)
    if value is None:
        return default
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidRequest(f"{key}: expected a number, got {value!r}") from None
    if math.isnan(out) or math.isinf(out):
        raise InvalidRequest(f"{key}: expected a finite number")
    return out


def _fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


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
        self.limits = dict(IMAGE_LIMITS)
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
        for key in IMAGE_LIMITS:
            if opts.get(key) is not None:
                self.limits[key] = int(opts[key])
                if self.limits[key] < 1:
                    raise ValueError(f"options.{key} must be a positive integer, got {opts[key]!r}")
        if opts.get("max_pixel_steps") is None:
            # One image of the largest size at the most steps, whatever those limits were set to.
            self.limits["max_pixel_steps"] = self.limits["max_pixels"] * self.limits["max_steps"]
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
            "samplers": _samplers.sampler_names(),
            "schedulers": [s["name"] for s in _samplers.SCHEDULERS],
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

    def _parse(self, job: Job) -> dict[str, Any]:
        p = job.params or {}
        lim = self.limits
        notes: list[str] = []
        width = _as_int(p, "width", 512)
        height = _as_int(p, "height", 512)
        if width < 8 or height < 8:
            raise InvalidRequest("width and height must be at least 8")
        if width % 8 or height % 8:
            w8, h8 = width - width % 8, height - height % 8
            notes.append(f"size {width}x{height} rounded down to {w8}x{h8} (multiples of 8)")
            width, height = w8, h8
        if width > lim["max_width"] or height > lim["max_height"]:
            raise InvalidRequest(f"size {width}x{height} exceeds this model's limit "
                                 f"{lim['max_width']}x{lim['max_height']}")
        if width * height > lim["max_pixels"]:
            raise InvalidRequest(f"size {width}x{height} exceeds this model's limit of {lim['max_pixels']} pixels")
        steps = _as_int(p, "steps", 20)
        if not 1 <= steps <= lim["max_steps"]:
            raise InvalidRequest(f"steps must be between 1 and {lim['max_steps']}, got {steps}")
        batch_size = _as_int(p, "batch_size", 1)
        if not 1 <= batch_size <= lim["max_batch"]:
            raise InvalidRequest(f"batch_size must be between 1 and {lim['max_batch']}, got {batch_size}")
        n_iter = _as_int(p, "n_iter", 1)
        if not 1 <= n_iter <= lim["max_iter"]:
            raise InvalidRequest(f"n_iter must be between 1 and {lim['max_iter']}, got {n_iter}")
        cfg_scale = _as_float(p, "cfg_scale", 7.0)
        sampler = _samplers.resolve_sampler(p.get("sampler_name") or p.get("sampler_index"))
        if sampler is None:
            raise InvalidRequest(f"unknown sampler {p.get('sampler_name')!r}; valid: "
                                 f"{', '.join(_samplers.sampler_names())}")
        schedule = _samplers.resolve_scheduler(p.get("scheduler"))
        if schedule is None:
            raise InvalidRequest(f"unknown scheduler {p.get('scheduler')!r}; valid: "
                                 f"{', '.join(s['name'] for s in _samplers.SCHEDULERS)}")
        if steps > self._schedule_cap(sampler):
            # diffusers' LCMScheduler raises a ValueError mid-job beyond its distillation schedule
            raise InvalidRequest(f"steps: sampler {sampler} runs at most {self._schedule_cap(sampler)} steps, "
                                 f"got {steps}")
        seed = p.get("seed")
        seed = -1 if seed is None else _as_int(p, "seed", -1)
        if seed < 0:
            seed = random.randrange(2**32)
        subseed = p.get("subseed")
        subseed = -1 if subseed is None else _as_int(p, "subseed", -1)
        if subseed < 0:
            subseed = random.randrange(2**32)
        prompt = p.get("prompt") or ""
        negative = p.get("negative_prompt") or ""
        if not isinstance(prompt, str) or not isinstance(negative, str):
            raise InvalidRequest("prompt and negative_prompt must be strings")
        clip_skip = None if p.get("clip_skip") is None else _as_int(p, "clip_skip", 1)
        if clip_skip is not None and not 1 <= clip_skip <= MAX_CLIP_SKIP:
            raise InvalidRequest(f"clip_skip must be between 1 and {MAX_CLIP_SKIP}, got {clip_skip}")
        eta = None if p.get("eta") is None else _as_float(p, "eta", 0.0)
        if eta is not None and not 0.0 <= eta <= MAX_ETA:
            raise InvalidRequest(f"eta must be between 0 and {MAX_ETA}, got {eta}")
        req: dict[str, Any] = {
            "op": job.op, "prompt": prompt, "negative_prompt": negative, "width": width, "height": height,
            "steps": steps, "cfg_scale": cfg_scale, "sampler_name": sampler, "scheduler": schedule,
            "seed": seed, "subseed": subseed, "batch_size": batch_size, "n_iter": n_iter,
            "send_images": p.get("send_images", True) is not False, "notes": notes,
            "eta": eta, "clip_skip": clip_skip,
        }
        if job.op == "img2img":
            strength = _as_float(p, "denoising_strength", 0.75)
            if not 0.0 <= strength <= 1.0:
                raise InvalidRequest(f"denoising_strength must be between 0 and 1, got {strength}")
            req["denoising_strength"] = strength
        # The whole job's cost (the router checked it too), before any image is decoded.
        cost = image_cost(job.op, req, lim["max_steps"])
        if cost > lim["max_pixel_steps"]:
            raise InvalidRequest(f"max_pixel_steps: this job costs {cost} pixel-steps (width x height x steps x "
                                 f"batch_size x n_iter), more than this model allows "
                                 f"(max_pixel_steps {lim['max_pixel_steps']})")
        if job.op == "img2img":
            raw = p.get("init_images")
            if not raw:
                raise InvalidRequest("init_images: img2img needs at least one image")
            if not isinstance(raw, (list, tuple)):
                raw = [raw]
            if len(raw) > MAX_INIT_IMAGES:
                raise InvalidRequest(f"init_images: at most {MAX_INIT_IMAGES} images")
            inits = []
            for k, data in enumerate(raw):
                img = _decode_image(data, f"init_images[{k}]").convert("RGB")
                if img.size != (width, height):
                    img = img.resize((width, height), _lanczos())
                inits.append(img)
            mask = None
            if p.get("mask"):
                from PIL import ImageFilter, ImageOps

                mask = _decode_image(p["mask"], "mask").convert("L")
                if mask.size != (width, height):
                    mask = mask.resize((width, height), _lanczos())
                if _truthy(p.get("inpainting_mask_invert")):
                    mask = ImageOps.invert(mask)
                blur = _as_int(p, "mask_blur", 0)
                if not 0 <= blur <= MAX_MASK_BLUR:
                    raise InvalidRequest(f"mask_blur must be between 0 and {MAX_MASK_BLUR}, got {blur}")
                if blur > 0:
                    mask = mask.filter(ImageFilter.GaussianBlur(blur))
            req.update(init_images=inits, mask=mask)
        return req

    def run(self, job: Job, ctx: JobContext) -> dict[str, Any]:
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

    def _generate(self, req: dict[str, Any], ctx: JobContext) -> dict[str, Any]:
        torch = self._torch
        t0 = time.perf_counter()
        notes: list[str] = req["notes"]
        op = req["op"]
        batch, n_iter = req["batch_size"], req["n_iter"]
        total = batch * n_iter
        steps = req["steps"]
        pipe = self._pipe
        call: dict[str, Any] = {
            "num_inference_steps": steps,
            "guidance_scale": req["cfg_scale"],
            "output_type": "pil",
        }
        if req["clip_skip"] is not None:
            clip_skip = int(req["clip_skip"])  # A1111 counts the last layer as 1; diffusers counts skipped ones
            layers = getattr(getattr(getattr(pipe, "text_encoder", None), "config", None), "num_hidden_layers", 0)
            if clip_skip > 1 and layers and clip_skip > layers:
                # diffusers would index past the encoder's hidden states (an IndexError mid-job)
                notes.append(f"clip_skip {clip_skip} is more than the text encoder's {layers} layers; ignored")
            elif clip_skip > 1 and hasattr(getattr(pipe, "text_encoder", None), "text_model"):
                call["clip_skip"] = clip_skip - 1
            elif clip_skip > 1:
                # diffusers' clip_skip reads text_encoder.text_model, which newer transformers' CLIP lacks.
                notes.append(f"clip_skip {clip_skip} is not supported with this transformers version; ignored")
        if req["eta"] is not None and req["sampler_name"] == "DDIM":
            call["eta"] = float(req["eta"])
        effective = steps
        if op == "img2img":
            strength = req["denoising_strength"]
            if strength <= 0:
                notes.append("denoising_strength 0: returned the init images unchanged")
                images: list[Any] = [req["init_images"][i % len(req["init_images"])] for i in range(total)]
                return self._result(req, images, list(range(total)), False, notes, t0)
            if req["mask"] is not None:
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
            # step of a small strength run, but its length is bounded by max_steps (mesh/jobs.py).
            n, effective = img2img_steps(steps, strength, self._schedule_cap(req["sampler_name"]))
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
                call.update(width=req["width"], height=req["height"])
        else:
            call.update(width=req["width"], height=req["height"])

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
            gens = [torch.Generator(device="cpu").manual_seed(req["seed"] + first + j) for j in range(batch)]
            scheduler_notes: list[str] = []
            with tiny_sd.quiet():
                pipe.scheduler = _samplers.make_scheduler(req["sampler_name"], req["scheduler"],
                                                          self._base_scheduler_config, scheduler_notes)
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
            args["prompt"] = [req["prompt"]] * batch
            args["negative_prompt"] = [req["negative_prompt"]] * batch
            args["generator"] = gens
            args["callback_on_step_end"] = on_step
            if op == "img2img":
                inits = req["init_images"]
                args["image"] = [inits[(first + j) % len(inits)] for j in range(batch)]
                if "mask_image" in args:
                    args["mask_image"] = [req["mask"]] * batch
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
        return self._result(req, images, image_index, interrupted, notes, t0)

    def _result(self, req: dict[str, Any], images: list[Any], index: list[int], interrupted: bool,
                notes: list[str], t0: float) -> dict[str, Any]:
        from PIL.PngImagePlugin import PngInfo

        seeds = [req["seed"] + i for i in index]
        subseeds = [req["subseed"] + i for i in index]
        infotexts = [self._infotext(req, s, ss) for s, ss in zip(seeds, subseeds, strict=True)]
        blobs: list[bytes] = []
        if req["send_images"]:
            for img, text in zip(images, infotexts, strict=True):
                info = PngInfo()
                info.add_text("parameters", text)
                buf = io.BytesIO()
                img.save(buf, format="PNG", pnginfo=info)
                blobs.append(buf.getvalue())
        result: dict[str, Any] = {
            "images": blobs,
            "seeds": seeds,
            "subseeds": subseeds,
            "infotexts": infotexts,
            "width": req["width"],
            "height": req["height"],
            "prompt": req["prompt"],
            "negative_prompt": req["negative_prompt"],
            "sampler_name": req["sampler_name"],
            "scheduler": req["scheduler"],
            "steps": req["steps"],
            "cfg_scale": req["cfg_scale"],
            "batch_size": req["batch_size"],
            "n_iter": req["n_iter"],
            "model": self.config.name,
            "model_hash": self.meta.get("hash"),
            "interrupted": interrupted,
            "notes": notes,
            "timings": {"total_s": round(time.perf_counter() - t0, 4)},
        }
        if req["op"] == "img2img":
            result["denoising_strength"] = req["denoising_strength"]
        return result

    def _infotext(self, req: dict[str, Any], seed: int, subseed: int) -> str:
        """A1111-style generation parameters, as stored in the PNG ``parameters`` chunk."""
        parts = [f"Steps: {req['steps']}", f"Sampler: {req['sampler_name']}"]
        if req["scheduler"] != "automatic":
            label = next((s["label"] for s in _samplers.SCHEDULERS if s["name"] == req["scheduler"]),
                         req["scheduler"])
            parts.append(f"Schedule type: {label}")
        parts += [f"CFG scale: {_fmt_num(req['cfg_scale'])}", f"Seed: {seed}",
                  f"Size: {req['width']}x{req['height']}"]
        if self.meta.get("hash"):
            parts.append(f"Model hash: {self.meta['hash']}")
        parts.append(f"Model: {self.config.name}")
        if req["op"] == "img2img":
            parts.append(f"Denoising strength: {_fmt_num(req['denoising_strength'])}")
        if req["clip_skip"] is not None and int(req["clip_skip"]) > 1:
            parts.append(f"Clip skip: {int(req['clip_skip'])}")
        parts.append("Version: velesio")
        lines = [req["prompt"]]
        if req["negative_prompt"]:
            lines.append(f"Negative prompt: {req['negative_prompt']}")
        lines.append(", ".join(parts))
        return "\n".join(lines)


def _lanczos() -> Any:
    from PIL import Image

    return getattr(Image, "Resampling", Image).LANCZOS
