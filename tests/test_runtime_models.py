"""Models at run time, socket-free: the router's side of a worker announcing new models (through the fake
mesh), REPLY bookkeeping, the memory estimate and fit check, model entries and settings, and the worker's
model phases. The real-process proof is in test_runtime_models_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from velesio import config as mesh_config
from velesio.backends import Backend, ModelConfig
from velesio.mesh import messages, protocol
from velesio.mesh.protocol import Command
from velesio.testing.mesh import FakeMesh
from velesio.worker import memory
from velesio.worker.admin import ModelAdmin
from velesio.worker.models import LoadedModel, keep_alive_of, model_config, size_of
from velesio.worker.supervisor import BackendLimits, BackendProcess

W1, W2 = b"w1", b"w2"


# ---- the router: a worker announced again ------------------------------------------------------------
def test_a_model_announced_at_run_time_takes_the_jobs_waiting_for_it():
    mesh = FakeMesh()
    mesh.join(W1, ["m"])
    rec = mesh.submit(model="n")  # queued: no worker offers n yet
    assert mesh.requests() == []
    mesh.join(W1, ["m", "n"])  # the same worker, announcing its new model
    assert set(mesh.scheduler.workers) == {W1} and mesh.where(mesh.request_for(rec)) == W1
    assert "n" in mesh.scheduler.live_models()


def test_a_model_gone_from_every_worker_ends_its_queue_and_becomes_unknown():
    mesh = FakeMesh()
    mesh.join(W1, ["m", "n"], slots=1)
    mesh.join(W2, ["n"], slots=1)
    running = [mesh.submit(model="n"), mesh.submit(model="n")]
    waiting = mesh.submit(model="n")
    mesh.join(W1, ["m"])  # n unloaded from w1: w2 still offers it, the queue waits for w2
    assert mesh.outcome(waiting) is None and "n" in mesh.scheduler.known_models
    mesh.join(W2, [])  # and from w2: nobody offers n any more
    err = mesh.outcome(waiting)
    assert err is not None and err[1].code == "no_worker" and "unloaded" in err[1].message
    assert "n" not in mesh.scheduler.known_models
    # The jobs in flight are the workers' to finish (a drain): their results still arrive.
    for rec in running:
        request = mesh.request_for(rec)
        mesh.final(mesh.where(request), request)
        assert mesh.outcome(rec)[0] == "final"  # type: ignore[index]


def test_a_job_refused_for_a_model_just_unloaded_ends_rather_than_waiting_for_ever():
    mesh = FakeMesh()
    mesh.join(W1, ["m", "n"])
    rec = mesh.submit(model="n")
    request = mesh.request_for(rec)  # on the wire as the worker unloads n
    mesh.join(W1, ["m"])
    mesh.error(W1, request, "busy", "model n was unloaded")
    err = mesh.outcome(rec)
    assert err is not None and err[1].code == "no_worker" and err[1].status == 503


def test_a_reannounce_does_not_count_running_jobs_twice():
    mesh = FakeMesh()
    mesh.join(W1, ["m"], slots=2)
    rec = mesh.submit()
    request = mesh.request_for(rec)
    mesh.join(W1, ["m"], slots=2, running={rec.job.id: "m"})  # a worker listing it anyway
    worker = mesh.scheduler.workers[W1]
    assert worker.free("m") == 1
    mesh.final(W1, request)
    assert worker.free("m") == 2


def test_a_sleeping_model_takes_jobs_but_a_loaded_one_goes_first():
    mesh = FakeMesh()
    mesh.join(W1, ["m"], backends={"m": {"state": "sleeping"}})
    mesh.join(W2, ["m"])
    first = mesh.submit()
    assert mesh.where(mesh.request_for(first)) == W2
    second = mesh.submit()  # w2 is full: the sleeping model on w1 is woken for it
    assert mesh.where(mesh.request_for(second)) == W1
    for state in ("draining", "loading"):
        mesh.heartbeat(W1, backends={"m": {"state": state}})
        assert not mesh.scheduler.workers[W1].available("m")


async def test_a_reply_reaches_its_change_and_a_lost_worker_ends_it():
    mesh = FakeMesh()
    mesh.join(W1, ["m"])
    worker = mesh.scheduler.workers[W1]
    done = mesh.scheduler.command_worker(worker, Command.UNLOAD, dict(messages.unload("r1", "m")))
    lost = mesh.scheduler.command_worker(worker, Command.LOAD, dict(messages.load("r2", {"name": "n"})))
    assert [s.body["id"] for s in mesh.frames(Command.UNLOAD)] == ["r1"]
    mesh.deliver(W1, Command.REPLY, messages.reply("r1", moved=2))
    assert done.result() == {"id": "r1", "ok": True, "moved": 2}
    mesh.leave(W1)
    reply = lost.result()
    assert reply["ok"] is False and reply["code"] == "no_worker" and mesh.scheduler.replies == {}


def test_protocol_bodies_and_versions():
    assert messages.update("i", "m", slots=3) == {"id": "i", "model": "m", "slots": 3}
    assert messages.update("i", "m", keep_alive=None, set_keep_alive=True) == {"id": "i", "model": "m",
                                                                                "keep_alive": None}
    assert messages.reply("i", code="conflict", message="busy") == {"id": "i", "ok": False, "code": "conflict",
                                                                     "message": "busy"}
    assert protocol.version_tuple("2.1") >= protocol.MODELS_AT_RUN_TIME > protocol.version_tuple("2.0")
    assert protocol.version_tuple("garbage") == (0, 0)
    assert set(protocol.REPLY_CODES) - {"conflict", "load_failed"} <= set(protocol.ERROR_CODES) | set(
        protocol.MESH_ERROR_CODES)


# ---- memory ---------------------------------------------------------------------------------------------
def test_the_estimate_is_the_files_and_a_tenth(tmp_path: Path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"\0" * (10 * 2**20))
    folder = tmp_path / "pipe"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.safetensors").write_bytes(b"\0" * (3 * 2**20))
    (folder / "model_index.json").write_bytes(b"\0" * 2**20)
    assert memory.estimate_mb(str(gguf)) == 11
    assert memory.estimate_mb(str(folder)) == 5  # 4 MB of files
    assert memory.estimate_mb(str(gguf), size_mb=500) == 500
    assert memory.estimate_mb(None) is None and memory.estimate_mb(str(tmp_path / "none")) is None


def test_the_fit_check_names_what_is_short():
    assert memory.refusal("m", 100, free=1000, budget_mb=None, committed_mb=0) is None
    assert memory.refusal("m", None, free=0, budget_mb=1, committed_mb=5) is None  # unknown size: not checked
    assert memory.refusal("m", 0, free=0, budget_mb=1, committed_mb=5) is None  # size_mb 0: not checked
    budget = memory.refusal("m", 100, free=1000, budget_mb=150, committed_mb=60)
    assert budget == "model m needs about 100 MB, and this worker's models already take 60 MB of its " \
                     "memory_budget_mb of 150 MB"
    free = memory.refusal("m", 100, free=99, budget_mb=None, committed_mb=0)
    assert free == "model m needs about 100 MB, but only 99 MB of memory are free"


def test_free_memory_takes_the_smallest_known_figure(tmp_path: Path, monkeypatch):
    (tmp_path / "max").write_text(f"{300 * 2**20}\n")
    (tmp_path / "current").write_text(f"{100 * 2**20}\n")
    (tmp_path / "nolimit").write_text("max\n")
    assert memory.cgroup_room_mb(str(tmp_path / "max"), str(tmp_path / "current")) == 200
    assert memory.cgroup_room_mb(str(tmp_path / "nolimit"), str(tmp_path / "current")) is None
    monkeypatch.setattr(memory, "meminfo_mb", lambda: {"MemAvailable": 5000})
    monkeypatch.setattr(memory, "cgroup_room_mb", lambda: 700)
    assert memory.free_mb() == 700
    assert memory.free_mb({"device": "cuda:0 X", "memory_free_mb": 300}) == 300
    assert memory.free_mb({"device": "cpu", "memory_free_mb": 300}) == 700


# ---- configuration --------------------------------------------------------------------------------------
def test_admin_tokens_are_a_scope_of_their_own(tmp_path: Path):
    path = tmp_path / "mesh.yaml"
    path.write_text("router:\n  tokens: [u]\n  admin_tokens: [a, {token: b, name: ops}]\n"
                    "worker:\n  memory_budget_mb: 4096\n")
    cfg = mesh_config.load(path, env={})
    assert cfg.router.admin_tokens == {"a": "admin-1", "b": "ops"} and cfg.router.tokens == {"u": "token-1"}
    assert cfg.worker.memory_budget_mb == 4096
    assert mesh_config.load(path, env={"ADMIN_TOKENS": "x,y"}).router.admin_tokens == {"x": "admin-1",
                                                                                      "y": "admin-2"}
    with pytest.raises(mesh_config.ConfigError, match="also an API token"):
        mesh_config.load(path, env={"ADMIN_TOKENS": "u"})
    path.write_text("worker:\n  memory_budget_mb: 0\n")
    with pytest.raises(mesh_config.ConfigError, match="memory_budget_mb"):
        mesh_config.load(path, env={})


class Shipping(Backend):
    name = "ship"
    kind = "text"
    operations = ("completion",)

    @classmethod
    def embedded_models(cls) -> list[ModelConfig]:
        return [ModelConfig(name="tiny", backend="ship", path="/opt/tiny.bin", options={"n_ctx": 64})]

    def load(self):
        return {}

    def run(self, job, ctx):
        raise NotImplementedError


def test_model_entries_at_run_time():
    backends: dict[str, type[Backend]] = {"ship": Shipping}
    copy = model_config({"name": "tiny-2", "backend": "ship", "embedded": "tiny", "options": {"x": 1}}, "model",
                        backends)
    assert copy.path == "/opt/tiny.bin" and copy.options == {"n_ctx": 64, "x": 1}
    with pytest.raises(ValueError, match="ships no model named 'big'"):
        model_config({"name": "m", "backend": "ship", "embedded": "big"}, "model", backends)
    with pytest.raises(ValueError, match="path or embedded"):
        model_config({"name": "m", "backend": "ship", "embedded": "tiny", "path": "/x"}, "model", backends)
    with pytest.raises(ValueError, match="options"):
        model_config({"name": "m", "backend": "ship", "options": [1]}, "model", backends)
    assert keep_alive_of(None, "m") is None and keep_alive_of(300, "m") == 300.0
    for bad in (0, -1, True, "5m"):
        with pytest.raises(ValueError, match="keep_alive"):
            keep_alive_of(bad, "m")
    assert size_of({"size_mb": 0}, copy, "m") == 0 and size_of(None, copy, "m") is None  # no such file here
    with pytest.raises(ValueError, match="size_mb"):
        size_of({"size_mb": "big"}, copy, "m")


# ---- the worker's model phases ----------------------------------------------------------------------------
class _Events:
    def __getattr__(self, name):
        return lambda *a, **k: None


def loaded(name: str, *, size: int | None = 100, keep: float | None = None, used: float = 0.0) -> LoadedModel:
    cfg = ModelConfig(name=name, backend="ship", slots=2)
    process = BackendProcess(cfg, Shipping, _Events(), BackendLimits())  # never started
    process.state = "ready"
    return LoadedModel(cfg, process, "text", backend_cls=Shipping, keep_alive_s=keep, size_mb=size, last_used=used)


def test_what_a_model_offers_in_each_phase():
    model = loaded("m")
    model.busy = 1
    assert (model.state, model.free) == ("ready", 1)
    model.phase = "sleeping"
    assert (model.state, model.free) == ("sleeping", 1)  # it takes jobs: they wake it
    status = model.status(now=model.last_used + 5)
    assert status["state"] == "sleeping" and status["pid"] is None and status["size_mb"] == 100
    model.phase = "waking"
    assert model.state == "loading"
    model.phase = "draining"
    assert (model.state, model.free) == ("draining", 0)


class _Worker:
    def __init__(self, budget: int | None, *models: LoadedModel):
        self.name, self.memory_budget_mb, self.device = "w", budget, {"device": "cpu"}
        self.models = {m.config.name: m for m in models}
        self.loading: dict[str, LoadedModel] = {}
        self.beats = 0

    def beat(self) -> None:
        self.beats += 1


async def test_room_is_made_by_putting_idle_models_with_a_keep_alive_to_sleep(monkeypatch):
    monkeypatch.setattr(memory, "free_mb", lambda device=None: None)  # the budget decides here
    old, recent, pinned = loaded("old", keep=60, used=1.0), loaded("recent", keep=60, used=2.0), loaded("pinned")
    worker = _Worker(300, old, recent, pinned)
    admin = ModelAdmin(worker)  # type: ignore[arg-type]
    slept: list[str] = []

    async def stop() -> None:
        return None

    for model in (old, recent, pinned):
        model.process.stop = stop  # type: ignore[method-assign]
    original = admin.sleep

    async def sleep(model: LoadedModel, why: str) -> bool:
        slept.append(model.config.name)
        return await original(model, why)

    admin.sleep = sleep  # type: ignore[method-assign]
    assert admin.committed_mb() == 300
    assert await admin.make_room("new", 150) is None
    assert slept == ["old", "recent"] and old.phase == recent.phase == "sleeping" and pinned.phase == "serving"
    assert admin.committed_mb() == 100
    why = await admin.make_room("huge", 250)
    assert why is not None and "memory_budget_mb of 300 MB" in why  # pinned has no keep_alive: it stays
    recent.phase = "serving"
    recent.busy = 1  # a model at work is never put to sleep
    assert not admin.may_sleep(recent)
