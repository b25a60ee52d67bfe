"""The one admission path every job takes before it is queued: resolve its model (once), then check it
against what that model advertises. Dialects build the job; relay.py runs what this admits."""

from __future__ import annotations

import dataclasses
from typing import Any

from aiohttp import web

from velesio.mesh.jobs import Job, new_job_id
from velesio.mesh.limits import ParamError, check_image, image_limits
from velesio.mesh.params import ImageParams, Params, TemplateParams, TextParams

from . import aliases
from .errors import ApiError, context_exceeded, invalid
from .keys import CONFIG, SCHEDULER, TOKEN_NAME
from .validation import get_int

# No tokenizer packs more than this many characters into one token on average, so a prompt longer than
# n_ctx * MAX_CHARS_PER_TOKEN cannot fit: refuse it here instead of tokenizing megabytes on a worker.
MAX_CHARS_PER_TOKEN = 32
MAX_CHOICES = 16  # the most choices one request may ask for (n per prompt, times its prompts)


@dataclasses.dataclass
class Admitted:
    """A job whose model is resolved and whose parameters fit it; ``info`` is what the model's workers
    advertise (``meta``: n_ctx, limits, samplers, ...). ``tenant``, ``priority`` and ``weight`` place it in
    its model's queue (router/fairqueue.py)."""

    job: Job
    info: dict[str, Any]
    tenant: str = "anonymous"
    priority: int = 0
    weight: float = 1.0

    @property
    def meta(self) -> dict[str, Any]:
        return self.info.get("meta") or {}


async def admit(request: web.Request, job: Job) -> Admitted:
    """Resolve ``job.model`` (the default model of its op when empty; waits briefly for workers) and check
    the job against the model: ApiError when it cannot run there."""
    tenant, priority, weight = share(request)
    scheduler = request.app[SCHEDULER]
    job.model = await resolve_model(request, job.op, job.model or None)
    admitted = Admitted(job, scheduler.model_info(job.model) or {}, tenant, priority, weight)
    check(admitted)
    return admitted


async def resolve_model(request: web.Request, op: str, name: str | None) -> str:
    """The model a request that names ``name`` (None: the default) runs ``op`` on: its alias
    (``router.model_aliases``, router/aliases.py) resolved, then the scheduler's choice (which waits briefly
    for workers; 404 for a name nobody offers). A model that does not serve ``op`` is the client's mistake:
    400, with how to enable embeddings when that is what was asked."""
    scheduler = request.app[SCHEDULER]
    name = aliases.resolve(request.app[CONFIG].model_aliases, name, op, scheduler.live_models(),
                           scheduler.known_models)
    try:
        return await scheduler.resolve_model(op, name or None)
    except ApiError as err:
        if err.code != "not_supported":
            raise
        hint = (" (a llama-cpp model serves embeddings with options.embeddings: true in mesh.yaml)"
                if op == "embeddings" else "")
        raise ApiError("invalid_request", err.message + hint, {"operation": op}, param="model",
                       headers=err.headers) from None


def share(request: web.Request) -> tuple[str, int, float]:
    """(token name, priority, weight) of a request: its token's settings (``router.token_limits``, else
    ``router.rate_limit``); an ``X-Priority`` header may lower the priority, never raise it."""
    cfg = request.app[CONFIG]
    tenant = str(request.get(TOKEN_NAME) or "anonymous")
    limits = cfg.token_limits.get(tenant, cfg.rate_limit)
    priority = limits.priority
    asked = request.headers.get("X-Priority")
    if asked is not None:
        try:
            value = int(asked.strip())
        except ValueError:
            raise ApiError("invalid_request", f"X-Priority: an integer, not {asked[:40]!r}",
                           param="X-Priority") from None
        priority = min(priority, value)
    return tenant, priority, float(limits.weight)


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
        # n_prompt_tokens: the fewest tokens this many characters can be (already more than n_ctx)
        raise context_exceeded(ApiError(
            "context_exceeded", f"the prompt is {chars} characters, more than model '{job.model}' can take in "
            f"its context of {n_ctx} tokens", {"n_ctx": n_ctx, "n_prompt_tokens": chars // MAX_CHARS_PER_TOKEN},
            param="prompt"))


def siblings(admitted: Admitted, params: list[Params]) -> list[Admitted]:
    """One admitted job per entry of ``params``, for a request that asks for several (``n`` > 1, a list of
    prompts): the first is ``admitted`` with ``params[0]``, the others copies of its job with a new id. Each
    is checked against the model; they share the request's place in the queues."""
    out = []
    for i, p in enumerate(params):
        job = dataclasses.replace(admitted.job, params=p, id=admitted.job.id if i == 0 else new_job_id())
        sibling = dataclasses.replace(admitted, job=job)
        check(sibling)
        out.append(sibling)
    return out


def choices_per_prompt(body: dict[str, Any], prompts: int = 1, field: str = "n") -> int:
    """The choices wanted per prompt (OpenAI's ``n``, llama.cpp's ``n_cmpl``); all prompts' choices together
    at most MAX_CHOICES."""
    n = get_int(body, field, 1, lo=1, hi=MAX_CHOICES)
    if n * prompts > MAX_CHOICES:
        raise invalid(field, f"{prompts} prompts with {field}={n} make {n * prompts} choices; at most "
                      f"{MAX_CHOICES} in one request")
    return n


def choice_params(params: TextParams, prompts: list[str] | None, n: int) -> tuple[list[TextParams], list[int]]:
    """The params of each choice and the index of the prompt it continues: ``n`` per prompt (``prompts``
    None: the job's own), in order. A fixed seed gives choice ``j`` of a prompt the seed + ``j``, so that
    the choices differ and a repeated request gives the same ones."""
    out, prompt_of = [], []
    for i, prompt in enumerate(prompts or [params.prompt]):
        for j in range(n):
            seed = None if params.seed is None else (params.seed + j) % 2**31
            out.append(dataclasses.replace(params, prompt=prompt, seed=seed))
            prompt_of.append(i)
    return out, prompt_of
