"""AUTOMATIC1111 sampler and scheduler names, mapped onto diffusers scheduler classes.

This module imports neither torch nor diffusers at import time: the router imports it to validate and
list samplers (``/sdapi/v1/samplers``, ``/sdapi/v1/schedulers``) on hosts that have no image backend.
Only :func:`make_scheduler` touches diffusers, lazily.

A1111 names a *sampler* ("Euler a", "DPM++ 2M", ...) and, since 1.9, a separate *scheduler* (the sigma
schedule: "automatic", "karras", "exponential", ...). Older clients put the schedule into the sampler
name ("DPM++ 2M Karras"); those names are listed as samplers of their own, as A1111 < 1.9 did.
"""

from __future__ import annotations

import importlib.util
import inspect
from typing import Any

__all__ = [
    "SAMPLERS",
    "SCHEDULERS",
    "DEFAULT_SAMPLER",
    "DEFAULT_SCHEDULER",
    "sampler_names",
    "resolve_sampler",
    "resolve_scheduler",
    "make_scheduler",
]

DEFAULT_SAMPLER = "Euler a"
DEFAULT_SCHEDULER = "automatic"

# name -> (aliases, A1111 options, diffusers class, kwargs for that class)
_TABLE: list[tuple[str, list[str], dict[str, Any], str, dict[str, Any]]] = [
    ("DPM++ 2M", ["k_dpmpp_2m", "dpmpp_2m"], {},
     "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    ("DPM++ 2M Karras", ["k_dpmpp_2m_karras", "dpmpp_2m_karras"], {"scheduler": "karras"},
     "DPMSolverMultistepScheduler",
     {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    ("DPM++ SDE", ["k_dpmpp_sde", "dpmpp_sde"], {"second_order": "True", "brownian_noise": "True"},
     "DPMSolverSDEScheduler", {}),
    ("DPM++ SDE Karras", ["k_dpmpp_sde_karras", "dpmpp_sde_karras"],
     {"scheduler": "karras", "second_order": "True", "brownian_noise": "True"},
     "DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
    ("DPM++ 2M SDE", ["k_dpmpp_2m_sde", "dpmpp_2m_sde"], {"brownian_noise": "True"},
     "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    ("DPM++ 2M SDE Karras", ["k_dpmpp_2m_sde_karras", "dpmpp_2m_sde_karras"],
     {"scheduler": "karras", "brownian_noise": "True"},
     "DPMSolverMultistepScheduler",
     {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True}),
    ("DPM2", ["k_dpm_2", "dpm2"], {"discard_next_to_last_sigma": "True", "second_order": "True"},
     "KDPM2DiscreteScheduler", {}),
    ("DPM2 a", ["k_dpm_2_a", "dpm2_a"],
     {"discard_next_to_last_sigma": "True", "uses_ensd": "True", "second_order": "True"},
     "KDPM2AncestralDiscreteScheduler", {}),
    # k_euler_a_karras: some clients send it; there is no Karras variant of Euler a
    ("Euler a", ["k_euler_a", "k_euler_ancestral", "euler_a", "euler_ancestral", "euler-a", "k_euler_a_karras"],
     {"uses_ensd": "True"}, "EulerAncestralDiscreteScheduler", {}),
    ("Euler", ["k_euler", "euler"], {}, "EulerDiscreteScheduler", {}),
    ("LMS", ["k_lms", "lms"], {}, "LMSDiscreteScheduler", {}),
    ("LMS Karras", ["k_lms_karras", "lms_karras"], {"scheduler": "karras"},
     "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    ("Heun", ["k_heun", "heun"], {"second_order": "True"}, "HeunDiscreteScheduler", {}),
    ("DDIM", ["ddim"], {"default_eta_is_0": "True", "cfg_denoiser": "False"}, "DDIMScheduler", {}),
    ("PLMS", ["plms"], {"cfg_denoiser": "False"}, "PNDMScheduler", {"skip_prk_steps": True}),
    ("UniPC", ["unipc", "uni_pc"], {}, "UniPCMultistepScheduler", {}),
    ("LCM", ["k_lcm", "lcm"], {}, "LCMScheduler", {}),
]

SAMPLERS: list[dict[str, Any]] = [
    {"name": name, "aliases": list(aliases), "options": dict(options)}
    for name, aliases, options, _cls, _kw in _TABLE
]

# A1111 /sdapi/v1/schedulers, with the diffusers config keys each one sets where there is a simple match.
_SCHEDULE_TABLE: list[tuple[str, str, list[str] | None, float, bool, dict[str, Any]]] = [
    ("automatic", "Automatic", None, 0, False, {}),
    ("uniform", "Uniform", None, 0, True, {}),
    ("karras", "Karras", None, 7.0, False, {"use_karras_sigmas": True}),
    ("exponential", "Exponential", None, 0, False, {"use_exponential_sigmas": True}),
    ("polyexponential", "Polyexponential", None, 1.0, False, {"use_exponential_sigmas": True}),
    ("sgm_uniform", "SGM Uniform", ["SGMUniform"], 0, True, {"timestep_spacing": "trailing"}),
    ("kl_optimal", "KL Optimal", None, 0, False, {}),
    ("align_your_steps", "Align Your Steps", None, 0, False, {}),
    ("simple", "Simple", None, 0, True, {"timestep_spacing": "trailing"}),
    ("normal", "Normal", None, 0, True, {"timestep_spacing": "linspace"}),
    ("ddim", "DDIM", None, 0, True, {"timestep_spacing": "leading"}),
    ("beta", "Beta", None, 0, True, {"use_beta_sigmas": True}),
]

SCHEDULERS: list[dict[str, Any]] = [
    {"name": name, "label": label, "aliases": aliases, "default_rho": float(rho) if rho else -1,
     "need_inner_model": need}
    for name, label, aliases, rho, need, _kw in _SCHEDULE_TABLE
]

_SIGMA_KEYS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def _norm(name: str) -> str:
    return " ".join(str(name).strip().lower().replace("_", " ").replace("-", " ").split())


_SAMPLER_INDEX: dict[str, str] = {}
for _name, _aliases, _opts, _cls, _kw in _TABLE:
    for _key in [_name, *_aliases]:
        _SAMPLER_INDEX.setdefault(_norm(_key), _name)

_SCHEDULE_INDEX: dict[str, str] = {}
for _name, _label, _schedule_aliases, _rho, _need, _kw in _SCHEDULE_TABLE:
    for _key in [_name, _label, *(_schedule_aliases or [])]:
        _SCHEDULE_INDEX.setdefault(_norm(_key), _name)

_BY_NAME = {row[0]: row for row in _TABLE}
_SCHEDULE_BY_NAME = {row[0]: row for row in _SCHEDULE_TABLE}


def sampler_names() -> list[str]:
    """Canonical sampler names, in the order of ``SAMPLERS``."""
    return [s["name"] for s in SAMPLERS]


def resolve_sampler(name: str | None) -> str | None:
    """Canonical sampler name for a name or alias (case-insensitive), or None when unknown.

    An empty name or None resolves to :data:`DEFAULT_SAMPLER`, as A1111 does.
    """
    if name is None or not str(name).strip():
        return DEFAULT_SAMPLER
    return _SAMPLER_INDEX.get(_norm(name))


def resolve_scheduler(name: str | None) -> str | None:
    """Canonical A1111 scheduler name ("automatic", "karras", ...) or None when unknown.

    An empty name or None resolves to ``"automatic"``.
    """
    if name is None or not str(name).strip():
        return DEFAULT_SCHEDULER
    return _SCHEDULE_INDEX.get(_norm(name))


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _supported_keys(cls: type[Any]) -> set[str]:
    try:
        return set(inspect.signature(cls.__init__).parameters)
    except (TypeError, ValueError):  # pragma: no cover - exotic classes
        return set()


def make_scheduler(name: str, scheduler: str | None = None, base_config: Any = None,
                   notes: list[str] | None = None) -> Any:
    """A fresh diffusers scheduler for A1111 sampler ``name`` and A1111 ``scheduler`` (sigma schedule).

    ``base_config`` is the model's own scheduler config (``pipe.scheduler.config``); the sampler's
    settings are applied over it so the model's beta schedule and training steps are kept. Settings the
    chosen class does not support, or substitutions made, are described in ``notes`` when given.
    Raises ValueError for an unknown sampler or scheduler name.
    """
    import diffusers  # lazy: keeps the router free of torch

    canonical = resolve_sampler(name)
    if canonical is None:
        raise ValueError(f"unknown sampler {name!r}; valid: {', '.join(sampler_names())}")
    schedule = resolve_scheduler(scheduler)
    if schedule is None:
        raise ValueError(f"unknown scheduler {scheduler!r}; valid: "
                         f"{', '.join(s['name'] for s in SCHEDULERS)}")
    notes = notes if notes is not None else []
    _n, _aliases, _opts, cls_name, kwargs = _BY_NAME[canonical]
    kwargs = dict(kwargs)

    if cls_name == "DPMSolverSDEScheduler" and not _has("torchsde"):
        # DPMSolverSDEScheduler needs torchsde; the multistep SDE variant of DPM-Solver++ is the closest.
        cls_name = "DPMSolverMultistepScheduler"
        kwargs = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2,
                  **{k: v for k, v in kwargs.items() if k in _SIGMA_KEYS}}
        notes.append(f"{canonical}: torchsde is not installed, ran DPM++ 2M SDE instead")

    if cls_name == "LMSDiscreteScheduler" and not _has("scipy"):
        # LMSDiscreteScheduler integrates its coefficients with scipy; Euler is the first-order LMS.
        cls_name = "EulerDiscreteScheduler"
        notes.append(f"{canonical}: scipy is not installed, ran Euler instead")

    schedule_kwargs = dict(_SCHEDULE_BY_NAME[schedule][5])
    if schedule != "automatic":
        # an explicit schedule replaces the one a legacy "... Karras" name implies
        for key in _SIGMA_KEYS:
            kwargs.pop(key, None)
        kwargs.update(schedule_kwargs)
        if not schedule_kwargs:
            notes.append(f"scheduler {schedule!r} has no diffusers equivalent; used the sampler's default")

    cls = getattr(diffusers, cls_name)
    supported = _supported_keys(cls)
    config = dict(base_config or {})
    # the base config may carry sigma settings of the model's own scheduler; start from a neutral schedule
    for key in _SIGMA_KEYS:
        if key in config:
            config[key] = False
    if kwargs.get("use_beta_sigmas") and not _has("scipy"):
        kwargs.pop("use_beta_sigmas")
        notes.append("scheduler 'beta' needs scipy, which is not installed; used the sampler's default")
    dropped = [k for k in kwargs if supported and k not in supported]
    for key in dropped:
        kwargs.pop(key)
    if dropped:
        notes.append(f"{canonical} ({cls_name}) does not support {', '.join(sorted(dropped))}; ignored")
    return cls.from_config(config, **kwargs)
