"""The scheduler's handling of backend crashes, driven in-process (router/scheduler.py is socket-free): frames
from workers go in through ``process_worker``, what it sends comes out through ``send``."""

from __future__ import annotations

from typing import Any

from velesio.mesh import codec, protocol
from velesio.mesh.jobs import Job
from velesio.mesh.protocol import Command
from velesio.router.scheduler import Scheduler


class Mesh:
    """A scheduler and what it sent, with helpers that speak for workers."""

    def __init__(self, **kw: Any):
        self.sent: list[tuple[bytes, Command, dict[str, Any]]] = []
        self.scheduler = Scheduler(lambda identity, frame: self.sent.append((identity, *codec.decode(frame))), **kw)

    def join(self, identity: bytes, slots: int = 1, model: str = "m") -> None:
        self.scheduler.process_worker(identity, codec.encode(Command.READY, {
            "version": protocol.VERSION, "worker": identity.decode(),
            "capabilities": {"models": [{"name": model, "kind": "text", "operations": ["completion"],
                                         "slots": slots}]}}))

    def requests(self, identity: bytes | None = None) -> list[dict[str, Any]]:
        return [body for who, command, body in self.sent
                if command == Command.REQUEST and (identity is None or who == identity)]

    def reply(self, identity: bytes, command: Command, body: dict[str, Any]) -> None:
        self.scheduler.process_worker(identity, codec.encode(command, body))

    def crash(self, identity: bytes, request: dict[str, Any], alone: bool, jobs: int = 1) -> None:
        self.reply(identity, Command.ERROR, {
            "job": request["id"], "attempt": request["attempt"], "code": "backend_crashed", "message": "crashed",
            "details": {"alone": alone, "jobs": jobs, "reason": "killed by SIGABRT"}})


def submit(mesh: Mesh, prompt: str = "x") -> Any:
    return mesh.scheduler.submit(Job(op="completion", model="m", params={"prompt": prompt}))


def outcome(rec: Any) -> tuple[str, Any]:
    items = list(rec.events._items)
    assert items, "the job has not ended"
    return items[-1]


async def test_a_job_alone_in_a_crashed_backend_ends_without_a_retry():
    mesh = Mesh()
    mesh.join(b"w1")
    mesh.join(b"w2")
    rec = submit(mesh)
    [first] = mesh.requests()
    target = b"w1" if mesh.requests(b"w1") else b"w2"
    mesh.crash(target, first, alone=True)
    kind, err = outcome(rec)
    assert kind == "error" and err.code == "job_crashed_backend" and err.status == 500
    assert "crashed the backend" in err.message and "not retried" in err.message
    assert len(mesh.requests()) == 1  # never sent to the other worker
    # Both workers keep their slots: the next job is dispatched at once.
    submit(mesh, "next")
    assert len(mesh.requests()) == 2


async def test_the_crash_limit_is_configurable_to_two():
    mesh = Mesh(job_crash_limit=2)
    mesh.join(b"w1")
    mesh.join(b"w2")
    rec = submit(mesh)
    [first] = mesh.requests()
    mesh.crash(b"w1" if mesh.requests(b"w1") else b"w2", first, alone=True)
    assert not rec.done
    second = mesh.requests()[-1]
    assert second["id"] == first["id"] and second["attempt"] == 2
    mesh.crash(b"w1" if mesh.requests(b"w1")[-1:] == [second] else b"w2", second, alone=True)
    kind, err = outcome(rec)
    assert kind == "error" and err.code == "job_crashed_backend" and err.details["crashes"] == 2


async def test_a_shared_crash_is_retried_alone_then_blamed():
    mesh = Mesh()
    mesh.join(b"w1", slots=2)
    innocent, poison = submit(mesh, "fine"), submit(mesh, "poison")
    req_innocent, req_poison = mesh.requests(b"w1")
    for req in (req_innocent, req_poison):
        mesh.crash(b"w1", req, alone=False, jobs=2)
    assert not innocent.done and not poison.done
    # Retried one at a time, each holding both slots of the worker: the innocent job first (its slot was
    # free again when the second crash report came), the poison one once the innocent one is done.
    [first_retry] = mesh.requests(b"w1")[2:]
    assert first_retry["id"] == req_innocent["id"] and first_retry["exclusive"] is True
    mesh.reply(b"w1", Command.FINAL, {"job": first_retry["id"], "attempt": first_retry["attempt"],
                                      "result": {"text": "ok"}})
    assert outcome(innocent)[0] == "final"
    [second_retry] = mesh.requests(b"w1")[3:]
    assert second_retry["id"] == req_poison["id"] and second_retry["exclusive"] is True
    mesh.crash(b"w1", second_retry, alone=True)
    kind, err = outcome(poison)
    assert kind == "error" and err.code == "job_crashed_backend"


async def test_a_restart_for_another_jobs_sake_moves_the_job_without_blame():
    mesh = Mesh()
    mesh.join(b"w1")
    mesh.join(b"w2")
    rec = submit(mesh)
    [first] = mesh.requests()
    where = b"w1" if mesh.requests(b"w1") else b"w2"
    mesh.reply(where, Command.ERROR, {"job": first["id"], "attempt": 1, "code": "backend_restarted",
                                      "message": "restarted"})
    again = mesh.requests()[-1]
    assert again["attempt"] == 2 and "exclusive" not in again and not rec.done and rec.crashes == 0


async def test_a_model_whose_backend_restarts_takes_no_job_until_it_is_back():
    mesh = Mesh()
    mesh.join(b"w1")
    backends = {"m": {"state": "restarting", "crashes": 1, "restarts": 0}}
    mesh.reply(b"w1", Command.HEARTBEAT, {"backends": backends})
    rec = submit(mesh)
    assert mesh.requests() == [] and mesh.scheduler.queue_depth() == 1
    mesh.reply(b"w1", Command.HEARTBEAT, {"backends": {"m": {**backends["m"], "state": "ready", "restarts": 1}}})
    [request] = mesh.requests()
    assert request["id"] == rec.job.id
    summary = mesh.scheduler.workers[b"w1"].summary()
    assert summary["models"][0]["backend_process"]["restarts"] == 1
