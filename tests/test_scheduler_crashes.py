"""The scheduler's handling of backend crashes, driven in-process through a fake mesh (velesio/testing/mesh.py):
frames from workers go in through ``process_worker``, what it sends comes out through ``send``."""

from __future__ import annotations

from typing import Any

from velesio.testing.mesh import FakeMesh


def submit(mesh: FakeMesh, prompt: str = "x") -> Any:
    return mesh.submit(prompt=prompt)


def outcome(rec: Any) -> tuple[str, Any]:
    ended = FakeMesh.outcome(rec)
    assert ended is not None, "the job has not ended"
    return ended


async def test_a_job_alone_in_a_crashed_backend_ends_without_a_retry():
    mesh = FakeMesh()
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
    mesh = FakeMesh(job_crash_limit=2)
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
    mesh = FakeMesh()
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
    mesh.final(b"w1", first_retry)
    assert outcome(innocent)[0] == "final"
    [second_retry] = mesh.requests(b"w1")[3:]
    assert second_retry["id"] == req_poison["id"] and second_retry["exclusive"] is True
    mesh.crash(b"w1", second_retry, alone=True)
    kind, err = outcome(poison)
    assert kind == "error" and err.code == "job_crashed_backend"


async def test_a_restart_for_another_jobs_sake_moves_the_job_without_blame():
    mesh = FakeMesh()
    mesh.join(b"w1")
    mesh.join(b"w2")
    rec = submit(mesh)
    [first] = mesh.requests()
    where = b"w1" if mesh.requests(b"w1") else b"w2"
    mesh.error(where, first, "backend_restarted", "restarted")
    again = mesh.requests()[-1]
    assert again["attempt"] == 2 and "exclusive" not in again and not rec.done and rec.crashes == 0


async def test_a_model_whose_backend_restarts_takes_no_job_until_it_is_back():
    mesh = FakeMesh()
    mesh.join(b"w1")
    backends = {"m": {"state": "restarting", "crashes": 1, "restarts": 0}}
    mesh.heartbeat(b"w1", backends=backends)
    rec = submit(mesh)
    assert mesh.requests() == [] and mesh.scheduler.queue_depth() == 1
    mesh.heartbeat(b"w1", backends={"m": {**backends["m"], "state": "ready", "restarts": 1}})
    [request] = mesh.requests()
    assert request["id"] == rec.job.id
    summary = mesh.scheduler.workers[b"w1"].summary()
    assert summary["models"][0]["backend_process"]["restarts"] == 1
