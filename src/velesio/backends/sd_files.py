"""Stable Diffusion checkpoints on disk: telling SDXL from SD 1.x/2.x, and a stable short hash to name them
by (the A1111 "title"). No torch or diffusers import."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

_SDXL_KEYS = (
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias",  # SDXL base
    "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias",  # SDXL refiner
)



def detect_sdxl_folder(folder: str | os.PathLike) -> bool:
    """True when a diffusers folder holds an SDXL pipeline (``model_index.json`` ``_class_name``)."""
    try:
        index = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return "XL" in str(index.get("_class_name", "")) or "text_encoder_2" in index


def _safetensors_keys(path: str | os.PathLike) -> list[str] | None:
    """Tensor names from a .safetensors header (8-byte length + JSON), without loading any tensor."""
    try:
        with open(path, "rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length <= 0 or length > 100 * 1024 * 1024:
                return None
            header = json.loads(fh.read(length))
    except (OSError, ValueError, struct.error):
        return None
    return [k for k in header if k != "__metadata__"]


def detect_sdxl_file(path: str | os.PathLike) -> bool:
    """True when a single-file checkpoint looks like SDXL.

    .safetensors: by its tensor names (the second text encoder of SDXL). .ckpt cannot be read without
    unpickling it, so only its file name counts ("xl" in the name); set ``options.pipeline: sdxl`` when in
    doubt.
    """
    p = Path(path)
    if p.suffix.lower() == ".safetensors":
        keys = _safetensors_keys(p)
        if keys is not None:
            return any(k in keys for k in _SDXL_KEYS) or any(k.startswith("conditioner.embedders.1.") for k in keys)
    return "xl" in p.stem.lower()


def _file_digest(path: Path, h: hashlib._Hash) -> None:
    """Feed a file into ``h``: all of it when small, else its size and three 64 KiB samples."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        if size <= 32 * 1024 * 1024:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
            return
        h.update(str(size).encode())
        for offset in (0x100000, size // 2, size - 0x10000):
            fh.seek(offset)
            h.update(fh.read(0x10000))


def model_hash(path: str | os.PathLike) -> str:
    """A short (10 hex) stable fingerprint of a checkpoint file or diffusers folder."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for rel in ("model_index.json",):
            if (p / rel).is_file():
                h.update((p / rel).read_bytes())
        for sub in ("unet", "transformer"):
            folder = p / sub
            if folder.is_dir():
                for f in sorted(folder.iterdir()):
                    if f.suffix in (".safetensors", ".bin") or f.name == "config.json":
                        h.update(f.name.encode())
                        _file_digest(f, h)
                break
    else:
        _file_digest(p, h)
    return h.hexdigest()[:10]
