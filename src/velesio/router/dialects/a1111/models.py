"""AUTOMATIC1111 model names and what image models advertise: titles ("name [hash]"), matching a requested
checkpoint, and the samplers and schedulers a model's backend offers."""

from __future__ import annotations

import re
from typing import Any

from ...errors import invalid
from .parse import ImageRequest
from .render import model_hash


# ---- samplers and schedulers, as the model's workers advertise them -----------------------------
def _norm(name: str) -> str:
    return " ".join(str(name).strip().lower().replace("_", " ").replace("-", " ").split())


def _entries(meta: dict[str, Any], key: str) -> list[dict[str, Any]]:
    """The advertised ``samplers`` / ``schedulers`` as A1111 entries ({name, aliases, ...}); a backend that
    advertises plain names gets entries without aliases."""
    out = []
    for item in meta.get(key) or ():
        if isinstance(item, dict) and isinstance(item.get("name"), str):
            out.append(item)
        elif isinstance(item, str):
            out.append({"name": item, "aliases": []})
    return out


def _resolve(requested: str, entries: list[dict[str, Any]], extra_keys: tuple[str, ...] = ()) -> str | None:
    wanted = _norm(requested)
    for entry in entries:
        keys = [entry["name"], *(entry.get("aliases") or ()), *(str(entry.get(k) or "") for k in extra_keys)]
        if any(k and _norm(k) == wanted for k in keys):
            return str(entry["name"])
    return None


def resolve_samplers(req: ImageRequest, model: str, meta: dict[str, Any]) -> None:
    """Replace the requested sampler and scheduler names (aliases, any case) by the names the model's
    backend advertises; 400 naming the field when it offers no such one. A model that advertises none
    receives the names as sent (its backend decides)."""
    p = req.params
    samplers = _entries(meta, "samplers")
    if samplers:
        name = _resolve(p.sampler_name, samplers)
        if name is None:
            raise invalid(req.sampler_field, f"unknown sampler {p.sampler_name!r} for model '{model}'; valid "
                                             f"samplers: {', '.join(e['name'] for e in samplers)}")
        p.sampler_name = name
    schedulers = _entries(meta, "schedulers")
    if schedulers:
        name = _resolve(p.scheduler, schedulers, ("label",))
        if name is None:
            raise invalid("scheduler", f"unknown scheduler {p.scheduler!r} for model '{model}'; valid "
                                       f"schedulers: {', '.join(e['name'] for e in schedulers)}")
        p.scheduler = name


def samplers_of(image_models: dict[str, dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """/sdapi/v1/samplers and /schedulers: the entries the live image models advertise, each name once."""
    seen: dict[str, dict[str, Any]] = {}
    for info in image_models.values():
        for entry in _entries(info.get("meta") or {}, key):
            seen.setdefault(entry["name"], entry)
    return list(seen.values())


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
