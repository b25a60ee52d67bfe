"""Bounds on what an image job may ask for, defined once and checked with the same code on both sides:
the router checks a job against the limits its model advertises before dispatch (a 400 naming the field),
and the backend checks it again against its own limits (a router of another version, or a harness, may
send it anything). Text bounds are the dialects' (each API's own ranges), with ``params.MAX_TOKENS``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .params import ImageParams

# Image limits a worker advertises in its model meta (each a key of its own); the defaults of the diffusers backend, and
# what the router assumes for an image model that advertises none.
IMAGE_LIMITS: dict[str, int] = {
    "max_width": 1024,
    "max_height": 1024,
    "max_pixels": 1024 * 1024,
    "max_steps": 150,
    "max_batch": 8,
    "max_iter": 100,
    # What one job may cost, in pixel-steps: width × height × steps × batch_size × n_iter (img2img: the steps
    # it really runs). Each limit above alone still admits a job that holds a slot for a day (1024² × 150
    # steps × 8 × 100 is about 19 hours on a CPU); this admits one max-size image at max steps.
    "max_pixel_steps": 1024 * 1024 * 150,
}

# Bounds that do not depend on the model.
MIN_SIDE = 64  # A1111's smallest width/height
CFG_RANGE = (0.0, 30.0)  # A1111's slider is 1..30; 0 is allowed for guidance-free (distilled) models
MAX_CLIP_SKIP = 12
MAX_ETA = 10.0
MAX_MASK_BLUR = 256
MAX_INIT_IMAGES = 64
MAX_IMAGE_SIDE = 8192  # an init image or mask larger than this is refused before it is decoded


class ParamError(ValueError):
    """A parameter out of bounds: ``field`` names it; the message says what is allowed."""

    def __init__(self, field: str, message: str, details: dict[str, Any] | None = None):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = f"{field}: {message}"
        self.details = details


def image_limits(meta: Mapping[str, Any] | None) -> dict[str, int]:
    """A model's image limits: what its meta advertises, the defaults for the rest. A model that advertises
    no ``max_pixel_steps`` may run one of its largest images at its most steps."""
    meta = meta or {}
    out = dict(IMAGE_LIMITS)
    for key in out:
        value = meta.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[key] = value
    if "max_pixel_steps" not in meta:
        out["max_pixel_steps"] = out["max_pixels"] * out["max_steps"]
    return out


def img2img_steps(steps: int, strength: float, max_steps: int) -> tuple[int, int]:
    """(length of the noise schedule, steps run) of an img2img job of ``steps`` at ``denoising_strength``.

    diffusers runs the last ``int(schedule × strength)`` steps of the schedule. When ``steps × strength`` is
    below one, the schedule grows until one step runs, at a noise level near ``strength`` (A1111 runs one
    step of little noise too), but never beyond ``max_steps``: below ``1 / max_steps`` the job runs one
    step of a ``max_steps`` schedule, the least noise the model's limit allows. Strength 0 runs nothing."""
    if not strength > 0:
        return steps, 0
    run = min(int(steps * strength), steps)
    if run >= 1:
        return steps, run
    top = max(steps, max_steps)
    if strength * top < 1:
        return top, 1
    n = max(steps, math.ceil(1 / strength))
    while n < top and int(n * strength) < 1:  # float rounding of 1 / strength
        n += 1
    return n, 1


def image_cost(op: str, params: ImageParams, max_steps: int) -> int:
    """A txt2img / img2img job's pixel-steps (see ``max_pixel_steps``)."""
    steps = params.steps
    if op == "img2img":
        steps = img2img_steps(steps, params.denoising_strength, max_steps)[1]
    return params.width * params.height * steps * params.batch_size * params.n_iter


def _between(field: str, value: float, lo: float, hi: float, why: str = "") -> None:
    if not lo <= value <= hi:  # also refuses NaN
        raise ParamError(field, f"must be between {lo:g} and {hi:g}{why}, got {value:g}")


def check_image(op: str, p: ImageParams, limits: Mapping[str, int], model: str = "") -> None:
    """Raise ParamError for the first field of ``p`` outside its bounds or the model's ``limits``."""
    of_model = f" for model '{model}'" if model else " for this model"
    for name, side, most in (("width", p.width, limits["max_width"]), ("height", p.height, limits["max_height"])):
        if side < MIN_SIDE:
            raise ParamError(name, f"must be at least {MIN_SIDE}, got {side}")
        if side % 8:
            raise ParamError(name, f"must be a multiple of 8, got {side} (try {side - side % 8})")
        if side > most:
            raise ParamError(name, f"must be <= {most}{of_model}, got {side}")
    if p.width * p.height > limits["max_pixels"]:
        raise ParamError("width", f"width x height must be <= {limits['max_pixels']} pixels{of_model}, "
                                  f"got {p.width}x{p.height}")
    _between("steps", p.steps, 1, limits["max_steps"], of_model)
    _between("batch_size", p.batch_size, 1, limits["max_batch"], of_model)
    _between("n_iter", p.n_iter, 1, limits["max_iter"], of_model)
    _between("cfg_scale", p.cfg_scale, *CFG_RANGE)
    _between("clip_skip", p.clip_skip, 1, MAX_CLIP_SKIP)
    if p.eta is not None:
        _between("eta", p.eta, 0.0, MAX_ETA)
    _between("denoising_strength", p.denoising_strength, 0.0, 1.0)  # txt2img too, as A1111 does (hires fix)
    if op == "img2img":
        if not p.init_images:
            raise ParamError("init_images", "img2img needs at least one image")
        if len(p.init_images) > MAX_INIT_IMAGES:
            raise ParamError("init_images", f"at most {MAX_INIT_IMAGES} images")
        _between("mask_blur", p.mask_blur, 0, MAX_MASK_BLUR)
    # The job's whole cost, so that no combination of limits admitted one by one holds a worker for hours.
    cost = image_cost(op, p, limits["max_steps"])
    if cost > limits["max_pixel_steps"]:
        steps = "steps run" if op == "img2img" else "steps"
        raise ParamError("max_pixel_steps", f"this job costs {cost} pixel-steps (width x height x {steps} x "
                                            f"batch_size x n_iter), more than allowed{of_model} (max_pixel_steps "
                                            f"{limits['max_pixel_steps']}); ask for fewer or smaller images, or "
                                            "fewer steps", {"max_pixel_steps": limits["max_pixel_steps"], "cost": cost})
