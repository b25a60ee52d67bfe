"""AUTOMATIC1111 model names and limits: titles ("name [hash]"), matching a requested checkpoint, and the
limits an image model advertises, checked before a job is dispatched."""

from __future__ import annotations

import re
from typing import Any

from velesio.mesh.jobs import IMAGE_LIMITS, image_cost

from ..errors import ApiError, invalid
from .a1111 import ImageRequest, model_hash


def limits(meta: dict[str, Any] | None) -> dict[str, int]:
    meta = meta or {}
    out = dict(IMAGE_LIMITS)
    for key in out:
        value = meta.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            out[key] = value
    if "max_pixel_steps" not in meta:  # a worker that advertises none: one largest image at the most steps
        out["max_pixel_steps"] = out["max_pixels"] * out["max_steps"]
    return out


def check_limits(req: ImageRequest, model: str, meta: dict[str, Any] | None) -> None:
    """Refuse, before dispatch, what the chosen model advertises it cannot do."""
    lim = limits(meta)
    p = req.params
    for name, key in (("width", "max_width"), ("height", "max_height")):
        if p[name] > lim[key]:
            raise invalid(name, f"must be <= {lim[key]} for model '{model}', got {p[name]}")
    if p["width"] * p["height"] > lim["max_pixels"]:
        raise invalid("width", f"width x height must be <= {lim['max_pixels']} pixels for model '{model}', "
                               f"got {p['width']}x{p['height']}")
    if p["steps"] > lim["max_steps"]:
        raise invalid("steps", f"must be between 1 and {lim['max_steps']} for model '{model}', got {p['steps']}")
    if p["batch_size"] > lim["max_batch"]:
        raise invalid("batch_size", f"must be between 1 and {lim['max_batch']} for model '{model}', "
                                    f"got {p['batch_size']}")
    if p["n_iter"] > lim["max_iter"]:
        raise invalid("n_iter", f"must be between 1 and {lim['max_iter']} for model '{model}', got {p['n_iter']}")
    # The job's whole cost, so that no combination of limits admitted one by one holds a worker for hours.
    cost = image_cost(req.op, p, lim["max_steps"])
    if cost > lim["max_pixel_steps"]:
        steps = "steps run" if req.op == "img2img" else "steps"
        raise ApiError("invalid_request",
                       f"max_pixel_steps: this job costs {cost} pixel-steps (width x height x {steps} x batch_size "
                       f"x n_iter), more than model '{model}' allows (max_pixel_steps {lim['max_pixel_steps']}); "
                       "ask for fewer or smaller images, or fewer steps",
                       {"max_pixel_steps": lim["max_pixel_steps"], "cost": cost})
    offered = (meta or {}).get("samplers")
    if isinstance(offered, list) and offered and p["sampler_name"] not in offered:
        raise invalid("sampler_name", f"model '{model}' does not offer sampler {p['sampler_name']!r}; "
                                      f"valid samplers: {', '.join(map(str, offered))}")


# ---- models -------------------------------------------------------------------------------------
def titles(image_models: dict[str, dict[str, Any]]) -> dict[str, str]:
    """model name -> A1111 title: the model's advertised title ("file [hash]") when no other live image
    model has the same one, else "name [hash]" (titles are how A1111 clients name checkpoints)."""
    advertised: dict[str, str] = {}
    for name, info in image_models.items():
        meta = info.get("meta") or {}
        h = model_hash(meta)
        advertised[name] = str(meta.get("title") or (f"{name} [{h}]" if h else name))
    counts: dict[str, int] = {}
    for title in advertised.values():
        counts[title] = counts.get(title, 0) + 1
    out = {}
    for name, title in advertised.items():
        if counts[title] > 1:
            h = model_hash(image_models[name].get("meta") or {})
            title = f"{name} [{h}]" if h else name
        out[name] = title
    return out


def match_model(requested: str, image_models: dict[str, dict[str, Any]]) -> str | None:
    """The model a client names: its name, its title, its advertised title, the title without the hash,
    its file name or its hash; exact first, then case-insensitive."""
    if requested in image_models:
        return requested
    named = titles(image_models)
    keys: list[tuple[str, str]] = []
    for name, info in image_models.items():
        meta = info.get("meta") or {}
        candidates = [named[name], str(meta.get("title") or ""), str(meta.get("model_name") or "")]
        candidates += [c.rsplit(" [", 1)[0] for c in candidates if c.endswith("]")]
        filename = str(meta.get("filename") or "")
        if filename:
            base = re.split(r"[\\/]", filename.rstrip("/\\"))[-1]
            candidates += [filename, base, base.rsplit(".", 1)[0]]
        h = model_hash(meta)
        if h:
            candidates.append(h)
        keys += [(c, name) for c in candidates if c]
    for exact in (True, False):
        for key, name in keys:
            if (key == requested) if exact else (key.lower() == requested.strip().lower()):
                return name
    return None


def sd_model_entry(name: str, title: str, meta: dict[str, Any]) -> dict[str, Any]:
    h = model_hash(meta)
    return {"title": title, "model_name": name, "hash": h, "sha256": meta.get("sha256") or h,
            "filename": meta.get("filename") or name, "config": None}


# ---- responses ----------------------------------------------------------------------------------
