"""Checks made before a job is queued, from what the chosen model advertises."""

from __future__ import annotations

from typing import Any

from velesio.mesh.jobs import Job

from .errors import ApiError

# No tokenizer packs more than this many characters into one token on average, so a prompt longer than
# n_ctx * MAX_CHARS_PER_TOKEN cannot fit: refuse it here instead of tokenizing megabytes on a worker.
MAX_CHARS_PER_TOKEN = 32


def prompt_chars(job: Job) -> int:
    params = job.params
    if job.op in ("chat", "apply_template"):
        return sum(len(m.get("content", "")) for m in params.get("messages") or [])
    if job.op == "completion":
        return len(params.get("prompt") or "")
    return 0


def check(job: Job, model: dict[str, Any]) -> None:
    n_ctx = (model.get("meta") or {}).get("n_ctx")
    if not isinstance(n_ctx, int) or n_ctx <= 0:
        return
    chars = prompt_chars(job)
    if chars > n_ctx * MAX_CHARS_PER_TOKEN:
        raise ApiError("context_exceeded", f"the prompt is {chars} characters, more than model '{job.model}' "
                       f"can take in its context of {n_ctx} tokens", {"n_ctx": n_ctx}, param="prompt")
