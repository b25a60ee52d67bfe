"""The one admission path every job takes before it is queued: resolve its model (once), then check it
against what that model advertises. Dialects build the job; relay.py runs what this admits."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from velesio.mesh.jobs import Job
from velesio.mesh.limits import ParamError, check_image, image_limits
from velesio.mesh.params import ImageParams, TemplateParams, TextParams

from .errors import ApiError
from .keys import SCHEDULER

# No tokenizer packs more than this many characters into one token on average, so a prompt longer than
# n_ctx * MAX_CHARS_PER_TOKEN cannot fit: refuse it here instead of tokenizing megabytes on a worker.
MAX_CHARS_PER_TOKEN = 32


@dataclasses.dataclass
class Admitted:
    """A job whose model is resolved and whose parameters fit it; ``info`` is what the model's workers
    advertise (``meta``: n_ctx, limits, samplers, ...)."""

    job: Job
    info: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        return self.info.get("meta") or {}


async def admit(request: web.Request, job: Job) -> Admitted:
    """Resolve ``job.model`` (the default model of its op when empty; waits briefly for workers) and check
    the job against the model: ApiError when it cannot run there."""
    scheduler = request.app[SCHEDULER]
    job.model = await scheduler.resolve_model(job.op, job.model or None)
    admitted = Admitted(job, scheduler.model_info(job.model) or {})
    check(admitted)
    return admitted


def prompt_chars(job: Job) -> int:
    params = job.params
    if isinstance(params, (TextParams, TemplateParams)) and job.op in ("chat", "apply_template"):
        return sum(len(str(m.get("content") or "")) for m in params.messages)
    if isinstance(params, TextParams):
        return len(params.prompt)
    return 0


def check(admitted: Admitted) -> None:
    job, meta = admitted.job, admitted.meta
    if isinstance(job.params, ImageParams):
        try:
            check_image(job.op, job.params, image_limits(meta), job.model)
        except ParamError as err:
            raise ApiError("invalid_request", err.message, err.details, param=err.field) from None
        return
    n_ctx = meta.get("n_ctx")
    if not isinstance(n_ctx, int) or n_ctx <= 0:
        return
    chars = prompt_chars(job)
    if chars > n_ctx * MAX_CHARS_PER_TOKEN:
        raise ApiError("context_exceeded", f"the prompt is {chars} characters, more than model '{job.model}' "
                       f"can take in its context of {n_ctx} tokens", {"n_ctx": n_ctx}, param="prompt")
