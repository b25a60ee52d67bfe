"""mesh.yaml, with environment overrides for the usual deployment knobs. See mesh.yaml for every setting."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from velesio.mesh import protocol


class ConfigError(ValueError):
    """mesh.yaml (or an environment override) is not valid."""


@dataclasses.dataclass
class TokenLimits:
    requests_per_minute: int = 60
    concurrent: int = 10
    weight: float = 1.0  # its share of a model's slots while others wait too (router/fairqueue.py)
    priority: int = 0  # its jobs go before those of lower priorities; a request may lower it (X-Priority)


@dataclasses.dataclass
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 8000
    mesh_bind: str = "tcp://0.0.0.0:5555"
    tokens: dict[str, str] = dataclasses.field(default_factory=dict)  # token -> name (names go in logs)
    # The operator API's tokens (/admin/*), never valid on the users' routes, nor theirs here; none: it is off.
    admin_tokens: dict[str, str] = dataclasses.field(default_factory=dict)
    token_limits: dict[str, TokenLimits] = dataclasses.field(default_factory=dict)  # name -> limits
    rate_limit: TokenLimits = dataclasses.field(default_factory=TokenLimits)
    default_text_model: str | None = None
    default_image_model: str | None = None
    queue_max: int = 64  # queued jobs per model
    queue_aging_s: float = 30.0  # a queued job gains one priority level per this many seconds waited
    routing: str = "cache_aware"  # or "least_loaded" (router/affinity.py)
    affinity_imbalance: float = 0.5  # how much busier (a fraction of its slots) a worker with the cache may be
    worker_wait_s: float = 5.0  # how long a request waits for a worker offering its model to appear
    max_body_mb: float = 32.0
    heartbeat_ms: int = protocol.HEARTBEAT_MS
    liveness: int = protocol.LIVENESS
    job_stall_s: float = 60.0
    job_crash_limit: int = 1  # backends a job may crash before it ends with job_crashed_backend (1 or 2)
    drain_s: float = 10.0  # on SIGTERM, how long requests in flight may finish
    cors_origins: list[str] = dataclasses.field(default_factory=lambda: ["*"])
    curve: dict[str, str] | None = None  # {secret_key, allowed_workers}; None: plain TCP
    options_scope: str = "token"  # A1111 /sdapi/v1/options changes: "token" (per token) or "global"
    # Model names clients send -> the served model they mean; "*": any name no worker offers.
    model_aliases: dict[str, str] = dataclasses.field(default_factory=dict)
    header_timeout_s: float = 10.0  # a request's line and headers must arrive within this long
    body_timeout_s: float = 60.0  # a request's body must arrive within this long of its headers
    keepalive_s: float = 75.0  # an idle keep-alive connection is closed after this long


@dataclasses.dataclass
class WorkerConfig:
    routers: list[str] = dataclasses.field(default_factory=lambda: ["tcp://127.0.0.1:5555"])
    name: str | None = None
    heartbeat_ms: int = protocol.HEARTBEAT_MS
    liveness: int = protocol.LIVENESS
    drain_s: float = 30.0
    cancel_grace_s: float = 10.0  # a cancelled job still running after this long ends by a backend restart
    partial_window_ms: float = protocol.PARTIAL_WINDOW_MS  # stream pieces this soon after the last PARTIAL go together
    models: list[dict[str, Any]] | None = None  # None: the embedded default models
    curve: dict[str, str] | None = None  # {secret_key, router_public_key}; None: plain TCP
    memory_budget_mb: int | None = None  # what this worker's models may take together, by their estimates


@dataclasses.dataclass
class MeshConfig:
    router: RouterConfig
    worker: WorkerConfig


def _fill(cls, data: Any, where: str):
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: must be a mapping")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown setting(s) {', '.join(sorted(unknown))}")
    return cls(**data)


def _parse_tokens(value: Any, where: str = "router.tokens", prefix: str = "token") -> dict[str, str]:
    """``tokens`` is a list of strings or of ``{token, name}``; API_TOKENS is comma-separated."""
    out: dict[str, str] = {}
    if isinstance(value, str):
        value = [t for t in (s.strip() for s in value.split(",")) if t]
    for i, item in enumerate(value or []):
        if isinstance(item, str):
            out[item] = f"{prefix}-{i + 1}"
        elif isinstance(item, dict) and isinstance(item.get("token"), str):
            out[item["token"]] = str(item.get("name") or f"{prefix}-{i + 1}")
        else:
            raise ConfigError(f"{where}[{i}]: a string or {{token, name}}")
    return out


def read_dotenv(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            line = line.strip()
            if line and not line.startswith("#") and "=" in line:
                key, _, val = line.partition("=")
                values[key.strip()] = val.strip().strip("'\"")
    return values


def load(path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> MeshConfig:
    env = dict(os.environ if env is None else env)
    env = {**read_dotenv(Path(".env")), **env}
    path = path or env.get("VELESIO_CONFIG")
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    router_raw = raw.get("router") or {}
    if not isinstance(router_raw, dict):
        raise ConfigError("router: must be a mapping")
    router_raw = dict(router_raw)
    tokens = _parse_tokens(router_raw.pop("tokens", None))
    admin_tokens = _parse_tokens(router_raw.pop("admin_tokens", None), "router.admin_tokens", "admin")
    limits_raw = router_raw.pop("token_limits", None) or {}
    if not isinstance(limits_raw, dict):
        raise ConfigError("router.token_limits: must be a mapping of token name to limits")
    rate_raw = router_raw.pop("rate_limit", None)
    router = _fill(RouterConfig, router_raw, "router")
    router.tokens = tokens
    router.admin_tokens = admin_tokens
    router.rate_limit = _fill(TokenLimits, rate_raw, "router.rate_limit")
    router.token_limits = {str(k): _fill(TokenLimits, v, f"router.token_limits.{k}") for k, v in limits_raw.items()}
    for where, lim in [("router.rate_limit", router.rate_limit),
                       *((f"router.token_limits.{k}", v) for k, v in router.token_limits.items())]:
        if isinstance(lim.weight, bool) or not isinstance(lim.weight, (int, float)) or not lim.weight > 0:
            raise ConfigError(f"{where}.weight: a number above 0, not {lim.weight!r}")
        if isinstance(lim.priority, bool) or not isinstance(lim.priority, int):
            raise ConfigError(f"{where}.priority: an integer, not {lim.priority!r}")
    if router.routing not in ("cache_aware", "least_loaded"):
        raise ConfigError(f"router.routing: 'cache_aware' or 'least_loaded', not {router.routing!r}")
    crash_limit = router.job_crash_limit
    if isinstance(crash_limit, bool) or crash_limit not in (1, 2):
        raise ConfigError(f"router.job_crash_limit: 1 or 2, not {crash_limit!r}")
    if router.options_scope not in ("token", "global"):
        raise ConfigError(f"router.options_scope: 'token' or 'global', not {router.options_scope!r}")
    aliases = router.model_aliases
    if aliases is None:
        router.model_aliases = {}
    elif not isinstance(aliases, dict) or not all(isinstance(k, str) and k and isinstance(v, str) and v
                                                  for k, v in aliases.items()):
        raise ConfigError("router.model_aliases: a mapping of model names to served model names "
                          "(\"*\" for any unknown name)")
    for key in ("header_timeout_s", "body_timeout_s", "keepalive_s"):
        value = getattr(router, key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ConfigError(f"router.{key}: a number of seconds > 0, not {value!r}")
    worker = _fill(WorkerConfig, raw.get("worker"), "worker")
    if isinstance(worker.routers, str):
        worker.routers = [worker.routers]
    grace = worker.cancel_grace_s
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or not grace > 0:
        raise ConfigError(f"worker.cancel_grace_s: a number of seconds > 0, not {grace!r}")
    window = worker.partial_window_ms
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not 0 <= window <= 1000:
        raise ConfigError(f"worker.partial_window_ms: a number of milliseconds from 0 to 1000, not {window!r}")
    budget = worker.memory_budget_mb
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise ConfigError(f"worker.memory_budget_mb: a whole number of MB >= 1 (or null: no budget), not {budget!r}")

    if env.get("API_TOKENS"):
        router.tokens = _parse_tokens(env["API_TOKENS"])
    if env.get("ADMIN_TOKENS"):
        router.admin_tokens = _parse_tokens(env["ADMIN_TOKENS"], "ADMIN_TOKENS", "admin")
    if set(router.admin_tokens) & set(router.tokens):
        raise ConfigError("router.admin_tokens: an admin token is also an API token; the operator API needs tokens "
                          "of its own")
    for key, attr, cast in (("VELESIO_HOST", "host", str), ("VELESIO_PORT", "port", int),
                            ("VELESIO_MESH_BIND", "mesh_bind", str)):
        if env.get(key):
            setattr(router, attr, cast(env[key]))
    if env.get("VELESIO_ROUTER"):
        worker.routers = [r.strip() for r in env["VELESIO_ROUTER"].split(",") if r.strip()]
    if env.get("VELESIO_WORKER_NAME"):
        worker.name = env["VELESIO_WORKER_NAME"]
    return MeshConfig(router=router, worker=worker)
