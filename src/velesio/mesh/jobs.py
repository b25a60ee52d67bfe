"""The one internal job model. Every HTTP dialect is translated into a Job at the edge; the scheduler,
the mesh and the backends see nothing else."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

from . import messages


def new_job_id() -> str:
    return "j-" + os.urandom(16).hex()  # 128 random bits, as uuid4().hex, without building a UUID


@dataclasses.dataclass
class Job:
    op: str  # one of mesh.protocol.TEXT_OPERATIONS / IMAGE_OPERATIONS
    model: str
    params: dict[str, Any]
    stream: bool = False
    id: str = dataclasses.field(default_factory=new_job_id)
    attempt: int = 1
    exclusive: bool = False  # run alone in its backend (a job retried after a crash it shared with others)

    def to_wire(self, seq: int | None = None) -> messages.Request:
        """The REQUEST body (``seq``: the worker registration's REQUEST number)."""
        return messages.request(self.id, self.attempt, self.op, self.model, self.stream, self.params,
                                exclusive=self.exclusive, seq=seq)

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> Job:
        return cls(op=str(body["op"]), model=str(body["model"]), params=dict(body.get("params") or {}),
                   stream=bool(body.get("stream")), id=str(body["id"]), attempt=int(body.get("attempt", 1)),
                   exclusive=bool(body.get("exclusive")))


# Text generation parameters as every backend receives them (dialects fill these, defaults applied):
#   prompt: str                       ("completion") / messages: list[{"role","content"}] ("chat")
#   max_tokens: int                   -1 = until end of text or context, 0 = evaluate the prompt only
#   temperature, top_p, top_k, min_p, typical_p, frequency_penalty, presence_penalty, repeat_penalty,
#   repeat_last_n, mirostat, mirostat_tau, mirostat_eta: numbers
#   stop: list[str]; seed: int | None (None = random); ignore_eos: bool
#   grammar: str | None (GBNF); json_schema: dict | None
#   cache_prompt: bool               reuse the KV cache of a common prompt prefix (faster; a fixed seed is
#                                     reproducible only without it)
#   resume_text: str                  text already streamed by an earlier attempt (failover)
TEXT_DEFAULTS: dict[str, Any] = {
    "max_tokens": 150,
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 40,
    "min_p": 0.05,
    "typical_p": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repeat_penalty": 1.0,
    "repeat_last_n": 64,
    "mirostat": 0,
    "mirostat_tau": 5.0,
    "mirostat_eta": 0.1,
    "stop": [],
    "seed": None,
    "ignore_eos": False,
    "grammar": None,
    "json_schema": None,
    "cache_prompt": True,
}


# Image limits a worker advertises in its model meta, and the router enforces before dispatch. These are
# the defaults of the diffusers backend, and what the router assumes for an image model advertising none.
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


def image_cost(op: str, params: dict[str, Any], max_steps: int) -> int:
    """A txt2img / img2img job's pixel-steps (see ``max_pixel_steps``), from its normalised params."""
    steps = int(params["steps"])
    if op == "img2img":
        steps = img2img_steps(steps, float(params.get("denoising_strength", 0.75)), max_steps)[1]
    return int(params["width"]) * int(params["height"]) * steps * int(params["batch_size"]) * int(params["n_iter"])
