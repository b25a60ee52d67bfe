"""AUTOMATIC1111 responses: the txt2img / img2img body (base64 PNGs, the request echo, ``info``), the
infotext A1111 writes into each PNG's ``parameters`` chunk and ``info.infotexts``, and /progress bodies."""

from __future__ import annotations

import base64
import json
import struct
import time
import zlib
from typing import Any

from velesio.mesh.params import ImageParams, ImageResult

from .parse import ImageRequest


def model_hash(meta: dict[str, Any]) -> str | None:
    value = meta.get("hash")
    return str(value) if value else None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def schedule_label(name: str, meta: dict[str, Any]) -> str:
    """A scheduler's A1111 label ("Karras") from the model's advertised schedulers."""
    for entry in meta.get("schedulers") or ():
        if isinstance(entry, dict) and entry.get("name") == name:
            return str(entry.get("label") or name)
    return name


def infotext(p: ImageParams, r: ImageResult, seed: int, meta: dict[str, Any]) -> str:
    """A1111's generation parameters of one image, as its PNG ``parameters`` chunk holds them (what
    /sdapi/v1/png-info and A1111's own PNG Info tab read back)."""
    parts = [f"Steps: {r.steps}", f"Sampler: {r.sampler_name}"]
    if r.scheduler != "automatic":
        parts.append(f"Schedule type: {schedule_label(r.scheduler, meta)}")
    parts += [f"CFG scale: {_num(r.cfg_scale)}", f"Seed: {seed}", f"Size: {r.width}x{r.height}"]
    if r.model_hash:
        parts.append(f"Model hash: {r.model_hash}")
    parts.append(f"Model: {r.model}")
    if r.denoising_strength is not None:
        parts.append(f"Denoising strength: {_num(r.denoising_strength)}")
    if r.clip_skip > 1:
        parts.append(f"Clip skip: {r.clip_skip}")
    parts.append("Version: velesio")
    lines = [p.prompt]
    if p.negative_prompt:
        lines.append(f"Negative prompt: {p.negative_prompt}")
    lines.append(", ".join(parts))
    return "\n".join(lines)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def with_parameters(png: bytes, text: str) -> bytes:
    """``png`` with an ``iTXt`` chunk ``parameters`` = ``text`` after its header chunk (UTF-8, as A1111 writes
    non-Latin-1 prompts); anything that is not a PNG is returned as it is."""
    if not png.startswith(_PNG_SIGNATURE) or len(png) < 33:
        return png
    data = b"parameters\x00\x00\x00\x00\x00" + text.encode("utf-8")  # keyword, no compression, no language
    chunk = struct.pack(">I", len(data)) + b"iTXt" + data + struct.pack(">I", zlib.crc32(b"iTXt" + data))
    end_of_header = 8 + 12 + struct.unpack(">I", png[8:12])[0]  # signature, then IHDR (length, type, data, crc)
    return png[:end_of_header] + chunk + png[end_of_header:]


def render(req: ImageRequest, result: ImageResult, model: str, meta: dict[str, Any]) -> dict[str, Any]:
    """The A1111 response: base64 PNGs (each with its infotext), the request echo, and ``info`` as a JSON
    string."""
    p = req.params
    seeds, subseeds = list(result.seeds), list(result.subseeds)
    texts = [infotext(p, result, s, meta) for s in seeds]
    images = [base64.b64encode(with_parameters(bytes(b), t)).decode("ascii")
              for b, t in zip(result.images, texts, strict=False)]
    n = len(seeds)
    notes = list(req.notes) + [str(x) for x in result.notes if str(x) not in req.notes]
    extra: dict[str, Any] = {}
    if result.scheduler and result.scheduler != "automatic":
        extra["Schedule type"] = schedule_label(result.scheduler, meta)
    info = {
        "prompt": p.prompt,
        "all_prompts": [p.prompt] * n,
        "negative_prompt": p.negative_prompt,
        "all_negative_prompts": [p.negative_prompt] * n,
        "seed": seeds[0] if seeds else p.seed,
        "all_seeds": seeds,
        "subseed": subseeds[0] if subseeds else p.subseed,
        "all_subseeds": subseeds,
        "subseed_strength": req.subseed_strength,
        "width": result.width or p.width,
        "height": result.height or p.height,
        "sampler_name": result.sampler_name or p.sampler_name,
        "scheduler": result.scheduler or p.scheduler,
        "cfg_scale": result.cfg_scale if result.steps else p.cfg_scale,
        "steps": result.steps or p.steps,
        "batch_size": p.batch_size,
        "restore_faces": req.restore_faces,
        "face_restoration_model": None,
        "sd_model_name": result.model or model,
        "sd_model_hash": result.model_hash or model_hash(meta),
        "sd_vae_name": None,
        "sd_vae_hash": None,
        "seed_resize_from_w": req.seed_resize[0],
        "seed_resize_from_h": req.seed_resize[1],
        "denoising_strength": (result.denoising_strength if result.steps else p.denoising_strength)
        if req.op == "img2img" else None,
        "extra_generation_params": extra,
        "index_of_first_image": 0,
        "infotexts": texts,
        "styles": req.styles,
        "job_timestamp": req.job_timestamp,
        "clip_skip": req.clip_skip,
        "is_using_inpainting_conditioning": False,
        "version": "velesio",
        "n_iter": p.n_iter,
        "interrupted": result.interrupted,
        "notes": notes,
    }
    # The echo of the request, with what was resolved: the seeds drawn for -1, the sampler and scheduler used.
    parameters = {**req.echo, "seed": info["seed"], "subseed": info["subseed"], "sampler_name": info["sampler_name"]}
    if "scheduler" in parameters:
        parameters["scheduler"] = info["scheduler"]
    return {"images": images, "parameters": parameters, "info": json.dumps(info, ensure_ascii=False)}


def empty_result() -> ImageResult:
    """The result of a job interrupted before it produced anything."""
    return ImageResult(interrupted=True, notes=["interrupted before any image was made"])


def idle_state() -> dict[str, Any]:
    return {"skipped": False, "interrupted": False, "job": "", "job_count": 0, "job_timestamp": "0",
            "job_no": 0, "sampling_step": 0, "sampling_steps": 0}


def progress_body(op: str | None, params: ImageParams | None, chunk: dict[str, Any] | None,
                  started: float | None, job_timestamp: str = "0", interrupted: bool = False,
                  queued_ahead: int = 0, now: float | None = None) -> dict[str, Any]:
    """/sdapi/v1/progress from one job's latest progress chunk ``{step, steps, image, images}``.

    As in A1111, ``job_count`` is the job's number of passes (``n_iter``) and ``job_no`` the pass in
    progress; ``progress`` = (passes done + step/steps of this pass) / passes."""
    state = idle_state()
    if op is None or params is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    n_iter = max(1, params.n_iter)
    batch = max(1, params.batch_size)
    chunk = chunk or {}
    steps = int(chunk.get("steps") or 0)
    step = min(int(chunk.get("step") or 0), steps) if steps else 0
    job_no = min(n_iter - 1, int(chunk.get("image") or 0) // batch) if chunk else 0
    progress = (job_no + (step / steps if steps else 0.0)) / n_iter if chunk else 0.0
    progress = max(0.0, min(1.0, progress))
    now = time.time() if now is None else now
    elapsed = max(0.0, now - started) if started else 0.0
    eta = elapsed / progress - elapsed if progress > 0 else 0.0
    state.update(job=op, job_count=n_iter, job_timestamp=job_timestamp, job_no=job_no, sampling_step=step,
                 sampling_steps=steps, interrupted=interrupted)
    if not chunk:
        textinfo = "Waiting for a worker" + (f" ({queued_ahead} job(s) ahead)" if queued_ahead else "")
    else:
        textinfo = f"Pass {job_no + 1}/{n_iter}, step {step}/{steps}"
    return {"progress": round(progress, 6), "eta_relative": round(eta, 3), "state": state,
            "current_image": None, "textinfo": textinfo}
