"""AUTOMATIC1111 (stable-diffusion-webui) requests: ``/sdapi/v1/txt2img`` and ``/sdapi/v1/img2img`` bodies
read into typed image params (velesio.mesh.params.ImageParams). The bounds are checked at admission, with
the model's limits (velesio.mesh.limits); samplers are resolved against what the model advertises
(models.py). No aiohttp here.

Defaults follow the seed's API reference where it names one (steps 20, cfg_scale 7.5, sampler "Euler a",
seed -1, 512×512); every other field follows A1111 (docs/images.md, "The A1111 API"). Unknown fields are
accepted and ignored, as A1111 does (``webuiapi`` sends many). Fields we cannot honour (hires fix, face
restoration, tiling, styles, scripts, variation seeds) are accepted and named in ``info.notes``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import random
import re
import time
from typing import Any

from velesio.mesh.limits import MAX_CLIP_SKIP, MAX_IMAGE_SIDE, MAX_INIT_IMAGES
from velesio.mesh.params import ImageParams

from ...errors import invalid
from ...validation import get_bool, get_float, get_int, get_str

MAX_SEED = 2**63 - 1

_JOB = ImageParams()  # the job defaults (velesio.mesh.params), which the echo shows where A1111 has the field

# The request echo ("parameters") starts from these: the job's defaults, else A1111's.
TXT2IMG_DEFAULTS: dict[str, Any] = {
    "prompt": _JOB.prompt, "negative_prompt": _JOB.negative_prompt, "styles": None, "seed": _JOB.seed,
    "subseed": _JOB.subseed, "subseed_strength": 0, "seed_resize_from_h": -1, "seed_resize_from_w": -1,
    "sampler_name": None, "scheduler": None, "batch_size": _JOB.batch_size, "n_iter": _JOB.n_iter,
    "steps": _JOB.steps, "cfg_scale": _JOB.cfg_scale, "width": _JOB.width, "height": _JOB.height,
    "restore_faces": None, "tiling": None, "do_not_save_samples": False, "do_not_save_grid": False,
    "eta": None, "denoising_strength": None, "s_min_uncond": None, "s_churn": None, "s_tmax": None,
    "s_tmin": None, "s_noise": None, "override_settings": None, "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False, "comments": None,
    "enable_hr": False, "firstphase_width": 0, "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None,
    "hr_second_pass_steps": 0, "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None,
    "hr_sampler_name": None, "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "",
    "force_task_id": None, "sampler_index": _JOB.sampler_name, "script_name": None, "script_args": [],
    "send_images": True, "save_images": False, "alwayson_scripts": {}, "infotext": None,
}
_TXT2IMG_ONLY = ("enable_hr", "firstphase_width", "firstphase_height", "hr_scale", "hr_upscaler",
                 "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_checkpoint_name", "hr_sampler_name",
                 "hr_scheduler", "hr_prompt", "hr_negative_prompt")
IMG2IMG_DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in TXT2IMG_DEFAULTS.items() if k not in _TXT2IMG_ONLY},
    "init_images": None, "resize_mode": 0, "image_cfg_scale": None, "mask": None,
    "mask_blur_x": _JOB.mask_blur, "mask_blur_y": _JOB.mask_blur, "mask_blur": None, "mask_round": True,
    "inpainting_fill": 0, "inpaint_full_res": True,
    "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "initial_noise_multiplier": None,
    "latent_mask": None, "include_init_images": False, "denoising_strength": _JOB.denoising_strength,
}

# GET /sdapi/v1/options: what an A1111 client may read; POSTed keys are stored over these.
OPTION_DEFAULTS: dict[str, Any] = {
    "send_seed": True,
    "send_size": True,
    "samples_format": "png",
    "grid_format": "png",
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "eta_ddim": 0.0,
    "eta_ancestral": 1.0,
    "return_grid": False,
    "enable_pnginfo": True,
    "sd_checkpoints_limit": 1,
    "samples_save": False,
    "outdir_samples": "",
    "show_progress_every_n_steps": 0,
    "live_previews_enable": False,
}
MAX_STORED_OPTIONS = 256


@dataclasses.dataclass
class ImageRequest:
    """A parsed txt2img / img2img request: the job params before the model is known, and what the
    response needs besides the job's result."""

    op: str
    params: ImageParams
    echo: dict[str, Any]
    model: str | None  # requested model (name or title), None for the caller's default
    model_field: str  # the field that named it, for errors
    sampler_field: str  # sampler_name or sampler_index, for errors
    notes: list[str]
    styles: list[str]
    restore_faces: bool
    subseed_strength: float
    seed_resize: tuple[int, int]
    clip_skip: int
    job_timestamp: str


# ---- images -------------------------------------------------------------------------------------
_DATA_URI = re.compile(r"^data:[^,]{0,200},", re.S)
_WS = re.compile(r"\s+")


def decode_image(value: Any, field: str) -> bytes:
    """The bytes of a base64 image (a ``data:image/...;base64,`` prefix allowed), checked to be a
    decodable image; 400 naming ``field`` otherwise."""
    if not isinstance(value, str) or not value.strip():
        raise invalid(field, "must be a base64-encoded image")
    text = _DATA_URI.sub("", value.strip(), count=1)
    text = _WS.sub("", text)
    if len(text) % 4:
        text += "=" * (-len(text) % 4)
    if "-" in text or "_" in text:  # the URL-safe alphabet
        text = text.replace("-", "+").replace("_", "/")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(field, "is not valid base64") from None
    if not data:
        raise invalid(field, "is empty")
    check_image(data, field)
    return data


def check_image(data: bytes, field: str) -> None:
    """Decode ``data`` with Pillow when the router has it, else check for a known image signature."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError:  # the router's base install has no Pillow; the worker decodes it again
        if not _sniff(data):
            raise invalid(field, "is not a PNG, JPEG, WebP, GIF or BMP image") from None
        return
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            if w < 1 or h < 1 or w > MAX_IMAGE_SIDE or h > MAX_IMAGE_SIDE:
                raise invalid(field, f"image size {w}x{h} is outside 1..{MAX_IMAGE_SIDE} pixels per side")
            img.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError,
            Image.DecompressionBombError) as exc:
        raise invalid(field, f"is not a decodable image ({type(exc).__name__})") from None


def _sniff(data: bytes) -> bool:
    return (data.startswith(b"\x89PNG\r\n\x1a\n") or data.startswith(b"\xff\xd8\xff")
            or data.startswith((b"GIF87a", b"GIF89a")) or data.startswith(b"BM")
            or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"))


# ---- parsing ------------------------------------------------------------------------------------
def _truthy(value: Any) -> bool:
    return bool(value) and value not in ("0", "false", "False", "none", "None")


def _override_settings(body: dict[str, Any]) -> dict[str, Any]:
    value = body.get("override_settings")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise invalid("override_settings", "must be an object")
    return value


def _prefixed(overrides: dict[str, Any], key: str) -> dict[str, Any]:
    """``{"override_settings.<key>": value}``, so that a validation error names the field in full."""
    return {f"override_settings.{key}": overrides[key]} if key in overrides else {}


def parse(op: str, body: dict[str, Any], options: dict[str, Any] | None = None) -> ImageRequest:
    """Validate everything that does not depend on the model (see :func:`check_limits` for the rest).
    ``options`` are the caller's stored /sdapi/v1/options (default model, clip skip)."""
    options = options or {}
    notes: list[str] = []
    overrides = _override_settings(body)

    prompt = get_str(body, "prompt", "")
    negative = get_str(body, "negative_prompt", "")
    defaults = _JOB
    width = get_int(body, "width", defaults.width)
    height = get_int(body, "height", defaults.height)
    steps = get_int(body, "steps", defaults.steps)
    cfg_scale = get_float(body, "cfg_scale", defaults.cfg_scale)
    batch_size = get_int(body, "batch_size", defaults.batch_size)
    n_iter = get_int(body, "n_iter", defaults.n_iter)
    # resolved against the samplers the model advertises, once it is known (models.resolve_samplers)
    sampler_field = "sampler_name" if body.get("sampler_name") not in (None, "") else "sampler_index"
    sampler = get_str(body, sampler_field, None) or defaults.sampler_name
    scheduler = get_str(body, "scheduler", None) or defaults.scheduler

    seed = get_int(body, "seed", -1, lo=-MAX_SEED, hi=MAX_SEED)
    if seed < 0:
        seed = random.randrange(2**32)
    subseed = get_int(body, "subseed", -1, lo=-MAX_SEED, hi=MAX_SEED)
    if subseed < 0:
        subseed = random.randrange(2**32)
    subseed_strength = get_float(body, "subseed_strength", 0.0, lo=0.0, hi=1.0)
    if subseed_strength > 0:
        notes.append("subseed_strength ignored: variation seeds are not supported")
    seed_resize = (get_int(body, "seed_resize_from_w", -1), get_int(body, "seed_resize_from_h", -1))
    if seed_resize[0] > 0 and seed_resize[1] > 0 and seed_resize != (width, height):
        notes.append("seed_resize_from_w/h ignored: resizing seeds is not supported")

    denoising = get_float(body, "denoising_strength", defaults.denoising_strength)
    send_images = get_bool(body, "send_images", True)

    clip_skip = get_int(_prefixed(overrides, "CLIP_stop_at_last_layers"), "override_settings.CLIP_stop_at_last_layers",
                        None, lo=1, hi=MAX_CLIP_SKIP)
    if clip_skip is None:
        clip_skip = get_int(body, "clip_skip", None, lo=1, hi=MAX_CLIP_SKIP)
    if clip_skip is None:
        stored = options.get("CLIP_stop_at_last_layers")
        ok = isinstance(stored, int) and not isinstance(stored, bool) and 1 <= stored <= MAX_CLIP_SKIP
        clip_skip = stored if ok else defaults.clip_skip

    styles = body.get("styles")
    if styles is None:
        styles = []
    if not isinstance(styles, list) or not all(isinstance(s, str) for s in styles):
        raise invalid("styles", "must be an array of style names")
    if styles:
        notes.append("styles ignored: prompt styles are not supported")
    restore_faces = _truthy(body.get("restore_faces"))
    if restore_faces:
        notes.append("restore_faces ignored: face restoration is not supported")
    if _truthy(body.get("tiling")):
        notes.append("tiling ignored: tiling is not supported")
    if op == "txt2img" and _truthy(body.get("enable_hr")):
        notes.append(f"enable_hr ignored: hires fix is not supported; the image is {width}x{height}")
    if body.get("script_name"):
        notes.append(f"script_name ignored: scripts are not supported ({str(body['script_name'])[:80]})")
    if isinstance(body.get("alwayson_scripts"), dict) and body["alwayson_scripts"]:
        notes.append("alwayson_scripts ignored: scripts are not supported ("
                     + ", ".join(sorted(str(k) for k in body["alwayson_scripts"]))[:200] + ")")
    ignored = sorted(k for k in overrides if k not in ("sd_model_checkpoint", "CLIP_stop_at_last_layers",
                                                       "samples_format"))
    if ignored:
        notes.append("override_settings ignored: " + ", ".join(str(k) for k in ignored)[:200])
    fmt = overrides.get("samples_format")
    if fmt not in (None, "png"):
        raise invalid("override_settings.samples_format", "only png is supported")

    model_field, model = "model", None
    if overrides.get("sd_model_checkpoint") not in (None, ""):
        model_field = "override_settings.sd_model_checkpoint"
        model = get_str(_prefixed(overrides, "sd_model_checkpoint"), model_field)
    elif body.get("model") not in (None, ""):
        model = get_str(body, "model")

    params = ImageParams(prompt=prompt, negative_prompt=negative, width=width, height=height, steps=steps,
                         cfg_scale=cfg_scale, sampler_name=sampler, scheduler=scheduler, seed=seed, subseed=subseed,
                         batch_size=batch_size, n_iter=n_iter, send_images=send_images, clip_skip=clip_skip,
                         eta=get_float(body, "eta", None), denoising_strength=denoising)

    echo_defaults = IMG2IMG_DEFAULTS if op == "img2img" else TXT2IMG_DEFAULTS
    echo = {**echo_defaults, **{k: body[k] for k in echo_defaults if k in body}}
    if op == "img2img":
        raw = body.get("init_images")
        if raw is None or raw == [] or raw == "":
            raise invalid("init_images", "img2img needs at least one image (a list of base64 strings)")
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, list):
            raise invalid("init_images", "must be an array of base64-encoded images")
        if len(raw) > MAX_INIT_IMAGES:  # before decoding any of them
            raise invalid("init_images", f"at most {MAX_INIT_IMAGES} images")
        params.init_images = [decode_image(v, f"init_images[{i}]") for i, v in enumerate(raw)]
        mask = body.get("mask")
        params.mask = None if mask in (None, "") else decode_image(mask, "mask")
        if params.mask is not None:
            params.inpainting_mask_invert = _truthy(body.get("inpainting_mask_invert"))
            blur = body.get("mask_blur")
            if blur is None:
                blur = body.get("mask_blur_x", defaults.mask_blur)
            params.mask_blur = get_int({"mask_blur": blur}, "mask_blur", defaults.mask_blur)
        if get_int(body, "resize_mode", 0) != 0:
            notes.append("resize_mode ignored: init images are stretched to width x height")
        if not get_bool(body, "include_init_images", False):
            echo["init_images"] = None
            echo["mask"] = None
    return ImageRequest(op=op, params=params, echo=echo, model=model, model_field=model_field,
                        sampler_field=sampler_field, notes=notes,
                        styles=list(styles), restore_faces=restore_faces, subseed_strength=subseed_strength,
                        seed_resize=seed_resize, clip_skip=clip_skip,
                        job_timestamp=time.strftime("%Y%m%d%H%M%S"))


