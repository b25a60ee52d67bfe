"""The scheduler's intricate paths (docs/protocol.md: failover, reconcile, stalls, cancel, busy, backend restarts),
driven through a fake mesh (velesio/testing/mesh.py): no processes, no sockets, and a clock moved by hand.
Each test asserts what the scheduler sends and what the job's handler reads. The end-to-end proof of the same
paths with real processes is in test_reliability.py, test_mesh_behaviour.py and test_supervision.py."""

from __future__ import annotations

import pytest

from velesio.mesh.protocol import Command
from velesio.router.errors import ApiError
from velesio.router.scheduler import MAX_ATTEMPTS, MAX_REFUSALS
from velesio.testing.mesh import FakeMesh

W1, W2, W3 = b"w1", b"w2", b"w3"


def two_workers(**kw) -> FakeMesh:
    mesh = FakeMesh(**kw)
    mesh.join(W1)
    mesh.join(W2)
    return mesh


def other(identity: bytes) -> bytes:
    return W2 if identity == W1 else W1


def expire(mesh: FakeMesh, dead: bytes, *alive: bytes) -> None:
    """Heartbeats from ``dead`` stop while ``alive`` keep beating, until the scheduler's expiry has passed."""
    for _ in range(3):
        mesh.advance(mesh.expiry_s / 2)
        for identity in alive:
            mesh.heartbeat(identity)
        mesh.tick()
    assert dead not in mesh.scheduler.workers


def error_of(mesh: FakeMesh, rec) -> ApiError:
    ended = mesh.outcome(rec)
    assert ended is not None and ended[0] == "error", ended
    return ended[1]


# ---- failover when a worker's heartbeats stop ------------------------------------------------------------
def test_a_silent_worker_is_kept_until_its_expiry():
    mesh = two_workers()
    rec = mesh.submit()
    mesh.advance(mesh.expiry_s * 0.9)
    mesh.tick()
    assert set(mesh.scheduler.workers) == {W1, W2}
    assert len(mesh.requests()) == 1 and mesh.outcome(rec) is None


def test_a_job_moves_to_the_other_worker_when_heartbeats_stop():
    mesh = two_workers()
    rec = mesh.submit(prompt="hello")
    first = mesh.request_for(rec)
    dead = mesh.where(first)
    expire(mesh, dead, other(dead))
    second = mesh.request_for(rec)
    assert mesh.where(second) == other(dead)
    assert second["attempt"] == 2 and second["id"] == first["id"]
    assert second["params"] == first["params"]  # nothing was visible yet: re-sent unchanged
    assert second["params"]["resume_text"] == ""
    assert mesh.outcome(rec) is None
    mesh.final(other(dead), second, {"text": "hi"})
    assert mesh.events(rec) == [("final", {"text": "hi"})]


def test_a_stream_that_sent_text_resumes_with_a_reduced_budget():
    mesh = two_workers()
    rec = mesh.submit(stream=True, max_tokens=10)
    first = mesh.request_for(rec)
    dead = mesh.where(first)
    mesh.partial(dead, first, "Hel", tokens=[1, 2])
    mesh.partial(dead, first, "lo", tokens=[3])
    expire(mesh, dead, other(dead))
    second = mesh.request_for(rec)
    assert mesh.where(second) == other(dead) and second["attempt"] == 2
    assert second["params"]["resume_text"] == "Hello"
    assert second["params"]["max_tokens"] == 7
    mesh.partial(other(dead), second, " world", tokens=[4])
    mesh.final(other(dead), second, {"text": " world"})
    assert [kind for kind, _ in mesh.events(rec)] == ["partial", "partial", "partial", "final"]


def test_a_stream_moved_twice_is_charged_each_token_once():
    mesh = two_workers()
    mesh.join(W3)
    rec = mesh.submit(stream=True, max_tokens=10)
    first = mesh.request_for(rec)
    dead = mesh.where(first)
    mesh.partial(dead, first, "Hello", tokens=[1, 2, 3])
    alive = [w for w in (W1, W2, W3) if w != dead]
    expire(mesh, dead, *alive)
    second = mesh.request_for(rec)
    assert second["params"]["max_tokens"] == 7
    dead2 = mesh.where(second)
    mesh.partial(dead2, second, " world", tokens=[4, 5])
    expire(mesh, dead2, *(w for w in alive if w != dead2))
    third = mesh.request_for(rec)
    assert third["attempt"] == 3
    assert third["params"]["resume_text"] == "Hello world"
    assert third["params"]["max_tokens"] == 10 - 5  # the original budget less all five tokens streamed


def test_a_stream_whose_budget_is_spent_ends_at_failover():
    mesh = two_workers()
    rec = mesh.submit(stream=True, max_tokens=2)
    first = mesh.request_for(rec)
    dead = mesh.where(first)
    mesh.partial(dead, first, "ab", tokens=[1, 2])
    expire(mesh, dead, other(dead))
    assert len(mesh.requests()) == 1
    kind, result = mesh.outcome(rec) or ("", {})
    assert kind == "final" and result["finish_reason"] == "length" and result["completion_tokens"] == 2


def test_with_no_other_worker_the_job_ends_with_no_worker():
    mesh = FakeMesh()
    mesh.join(W1)
    rec = mesh.submit()
    expire(mesh, W1)
    err = error_of(mesh, rec)
    assert err.code == "no_worker" and err.status == 503
    assert len(mesh.requests()) == 1 and not mesh.scheduler.jobs


def test_late_messages_from_a_removed_worker_are_dropped():
    mesh = two_workers()
    rec = mesh.submit(stream=True)
    first = mesh.request_for(rec)
    dead = mesh.where(first)
    expire(mesh, dead, other(dead))
    second = mesh.request_for(rec)
    mesh.partial(dead, first, "late")
    mesh.final(dead, first, {"text": "late"})
    # The router no longer knows the old worker: it is told to register again, and nothing reaches the job.
    assert [s.body["reason"] for s in mesh.frames(Command.DISCONNECT, dead)] == ["unknown", "unknown"]
    assert mesh.events(rec) == []
    mesh.final(other(dead), second, {"text": "fresh"})
    mesh.final(other(dead), second, {"text": "again"})  # a duplicate FINAL ends nothing twice
    assert mesh.events(rec) == [("final", {"text": "fresh"})]


# ---- reconcile through seq / seen ----------------------------------------------------------------------
def test_a_job_the_worker_does_not_list_is_failed_over_at_once():
    mesh = FakeMesh()
    mesh.join(W1, slots=2)
    lost, kept = mesh.submit(prompt="lost"), mesh.submit(prompt="kept")
    req_lost, req_kept = mesh.request_for(lost), mesh.request_for(kept)
    assert (req_lost["seq"], req_kept["seq"]) == (1, 2)
    mesh.heartbeat(W1, jobs=[kept.job.id], seen=2)
    again = mesh.request_for(lost)
    assert again["attempt"] == 2 and again["seq"] == 3 and mesh.where(again) == W1
    assert mesh.request_for(kept)["attempt"] == 1 and mesh.outcome(lost) is None
    mesh.final(W1, req_lost)  # the old attempt turns up after all: dropped
    assert mesh.outcome(lost) is None
    mesh.final(W1, again)
    assert mesh.outcome(lost) == ("final", {"text": "ok"})


def test_a_job_dispatched_after_seen_may_still_be_on_the_wire():
    mesh = FakeMesh()
    mesh.join(W1, slots=2)
    early = mesh.submit()
    mesh.heartbeat(W1, jobs=[], seen=0)  # sent before the first REQUEST arrived
    late = mesh.submit()
    mesh.heartbeat(W1, jobs=[early.job.id], seen=1)  # the second REQUEST (seq 2) is not seen yet
    assert [r["attempt"] for r in mesh.requests()] == [1, 1]
    assert mesh.outcome(early) is None and mesh.outcome(late) is None


def test_a_job_that_ends_at_reconcile_gives_its_slot_to_the_queue():
    mesh = FakeMesh()
    mesh.join(W1)
    rec = mesh.submit(stream=True, max_tokens=1)
    req = mesh.request_for(rec)
    mesh.partial(W1, req, "a")
    waiting = mesh.submit()
    assert mesh.scheduler.queue_depth() == 1
    mesh.heartbeat(W1, jobs=[], seen=req["seq"])  # forgotten; its budget is spent, so it ends here
    assert mesh.outcome(rec) is not None
    assert mesh.request_for(waiting)["attempt"] == 1 and mesh.scheduler.queue_depth() == 0


# ---- stalls --------------------------------------------------------------------------------------------
def test_a_job_without_progress_is_cancelled_and_moved():
    mesh = two_workers(job_stall_s=10)
    rec = mesh.submit()
    first = mesh.request_for(rec)
    stuck = mesh.where(first)
    for _ in range(2):  # 12 s in all, the worker beating but the job silent
        mesh.advance(6)
        mesh.heartbeat(W1)
        mesh.heartbeat(W2)
        mesh.tick()
    assert mesh.cancels(stuck) == [{"job": first["id"], "attempt": 1, "keep": False}]
    second = mesh.request_for(rec)
    assert second["attempt"] == 2 and mesh.where(second) == other(stuck)
    # The stuck worker keeps the slot until it answers: a new job waits.
    queued = mesh.submit()
    assert mesh.scheduler.queue_depth() == 1
    mesh.partial(stuck, first, "late")
    mesh.error(stuck, first, "cancelled")
    assert mesh.events(rec) == [] and mesh.outcome(rec) is None
    assert mesh.where(mesh.request_for(queued)) == stuck
    mesh.final(other(stuck), second)
    assert mesh.events(rec) == [("final", {"text": "ok"})]


def test_a_job_whose_progress_count_moves_is_not_stalled():
    mesh = FakeMesh(job_stall_s=10)
    mesh.join(W1)
    rec = mesh.submit()
    for count in range(1, 5):  # 24 s, the count moving every 6 s
        mesh.advance(6)
        mesh.heartbeat(W1, progress={rec.job.id: count})
        mesh.tick()
    assert mesh.cancels() == [] and len(mesh.requests()) == 1
    for _ in range(2):  # then 12 s with the count standing still
        mesh.advance(6)
        mesh.heartbeat(W1, progress={rec.job.id: 4})
        mesh.tick()
    assert [c["job"] for c in mesh.cancels(W1)] == [rec.job.id]


def test_partials_keep_a_job_alive():
    mesh = FakeMesh(job_stall_s=10)
    mesh.join(W1)
    rec = mesh.submit(stream=True)
    req = mesh.request_for(rec)
    for _ in range(4):
        mesh.advance(6)
        mesh.partial(W1, req, "x")
        mesh.tick()
    assert mesh.cancels() == [] and mesh.outcome(rec) is None


# ---- cancel --------------------------------------------------------------------------------------------
def test_cancelling_a_queued_job_removes_it():
    mesh = FakeMesh()
    mesh.join(W1)
    running, queued = mesh.submit(), mesh.submit()
    mesh.cancel(queued)
    assert error_of(mesh, queued).code == "cancelled"
    assert mesh.scheduler.queue_depth() == 0 and mesh.cancels() == []
    mesh.final(W1, mesh.request_for(running))
    assert [r["id"] for r in mesh.requests()] == [running.job.id]


def test_cancelling_a_running_job_frees_its_slot_when_the_worker_answers():
    mesh = FakeMesh()
    mesh.join(W1)
    rec = mesh.submit()
    req = mesh.request_for(rec)
    mesh.cancel(rec)
    assert mesh.cancels(W1) == [{"job": rec.job.id, "attempt": 1, "keep": False}]
    assert error_of(mesh, rec).code == "cancelled"
    nxt = mesh.submit()
    assert mesh.scheduler.queue_depth() == 1  # the slot is the worker's until it stops the job
    mesh.error(W1, req, "cancelled")
    assert mesh.request_for(nxt)["attempt"] == 1
    assert len([e for e in mesh.events(rec) if e[0] != "partial"]) == 1


def test_an_interrupt_keeps_the_job_for_what_the_worker_returns():
    mesh = FakeMesh()
    mesh.join(W1)
    rec = mesh.submit()
    mesh.cancel(rec, keep=True)
    assert mesh.cancels(W1) == [{"job": rec.job.id, "attempt": 1, "keep": True}]
    assert mesh.outcome(rec) is None
    mesh.final(W1, mesh.request_for(rec), {"text": "partial result"})
    assert mesh.outcome(rec) == ("final", {"text": "partial result"})


# ---- busy, DISCONNECT, backend restarts ----------------------------------------------------------------
def test_a_busy_worker_gives_the_job_back_to_the_queue():
    mesh = two_workers()
    rec = mesh.submit()
    first = mesh.request_for(rec)
    busy = mesh.where(first)
    mesh.error(busy, first, "busy")
    second = mesh.request_for(rec)
    assert second["attempt"] == 2 and mesh.where(second) == other(busy) and mesh.outcome(rec) is None


def test_a_worker_that_leaves_hands_its_jobs_over():
    mesh = two_workers()
    rec = mesh.submit()
    first = mesh.request_for(rec)
    leaving = mesh.where(first)
    mesh.leave(leaving)
    assert leaving not in mesh.scheduler.workers
    second = mesh.request_for(rec)
    assert second["attempt"] == 2 and mesh.where(second) == other(leaving)
    mesh.heartbeat(leaving)
    assert mesh.frames(Command.DISCONNECT, leaving)[-1].body == {"reason": "unknown"}
    mesh.final(leaving, first)
    assert mesh.outcome(rec) is None


def test_a_restarting_backend_takes_no_job_until_it_is_ready():
    restarting = {"m": {"state": "restarting", "crashes": 1, "restarts": 0}}
    mesh = FakeMesh()
    mesh.join(W1, backends=restarting)
    mesh.join(W2)
    mesh.heartbeat(W2, backends=restarting)
    first, second = mesh.submit(), mesh.submit()
    assert mesh.requests() == [] and mesh.scheduler.queue_depth() == 2
    mesh.heartbeat(W1, backends=restarting)  # still restarting
    assert mesh.requests() == []
    mesh.heartbeat(W2, backends={"m": {"state": "ready", "crashes": 1, "restarts": 1}})
    assert [(mesh.where(r), r["id"]) for r in mesh.requests()] == [(W2, first.job.id)]
    mesh.heartbeat(W1, backends={"m": {"state": "ready", "crashes": 1, "restarts": 1}})
    assert mesh.where(mesh.request_for(second)) == W1


def test_a_draining_worker_takes_no_new_job():
    mesh = two_workers()
    mesh.heartbeat(W1, draining=True)
    for _ in range(2):
        rec = mesh.submit()
        assert mesh.where(mesh.request_for(rec)) == W2
        mesh.final(W2, mesh.request_for(rec))


# ---- several routers share the workers -------------------------------------------------------------------
def test_a_refusal_is_no_failure_and_the_refusing_worker_counts_as_full_until_it_beats():
    mesh = two_workers()
    rec = mesh.submit()
    for _ in range(MAX_ATTEMPTS + 2):  # more refusals than attempts: still not a failure
        req = mesh.request_for(rec)
        mesh.error(mesh.where(req), req, "busy")
        mesh.heartbeat(mesh.where(req), jobs=[], seen=len(mesh.requests()), load={"m": 1})
    assert mesh.outcome(rec) is None
    req = mesh.request_for(rec)
    mesh.error(W1 if mesh.where(req) == W1 else W2, req, "busy")
    # Both refused last: the job waits for a worker that says it has room again.
    before = len(mesh.requests())
    mesh.error(mesh.where(mesh.request_for(rec)), mesh.request_for(rec), "busy")
    assert len(mesh.requests()) == before and mesh.scheduler.queue_depth() == 1
    mesh.heartbeat(W2, jobs=[], seen=len(mesh.requests()), load={"m": 1})
    assert mesh.where(mesh.request_for(rec)) == W2
    mesh.final(W2, mesh.request_for(rec))
    assert mesh.outcome(rec)[0] == "final"


def test_slots_another_router_holds_are_not_offered():
    mesh = FakeMesh()
    mesh.join(W1, slots=2)
    mesh.heartbeat(W1, jobs=[], seen=0, load={"m": 0})  # another router holds both slots
    rec = mesh.submit()
    assert not mesh.requests() and mesh.scheduler.queue_depth() == 1
    mesh.heartbeat(W1, jobs=[], seen=0, load={"m": 1})  # one of them ended
    first = mesh.request_for(rec)
    second = mesh.submit()
    assert mesh.scheduler.queue_depth() == 1  # the other slot is still theirs
    mesh.heartbeat(W1, jobs=[first["id"]], seen=1, load={"m": 0})  # our job runs, theirs too
    mesh.final(W1, first)
    assert mesh.request_for(second)["attempt"] == 1  # our own slot came back


def test_a_job_refused_too_often_ends_with_busy():
    mesh = FakeMesh()
    mesh.join(W1)
    rec = mesh.submit()
    for _ in range(MAX_REFUSALS + 1):
        req = mesh.request_for(rec)
        mesh.error(W1, req, "busy")
        if mesh.outcome(rec) is None:
            mesh.heartbeat(W1, jobs=[], seen=len(mesh.requests()), load={"m": 1})
    err = error_of(mesh, rec)
    assert err.code == "busy" and err.status == 503


# ---- limits --------------------------------------------------------------------------------------------
def test_a_full_queue_refuses_new_jobs():
    mesh = FakeMesh(queue_max=1)
    mesh.join(W1)
    running, queued = mesh.submit(), mesh.submit()
    with pytest.raises(ApiError) as refused:
        mesh.submit()
    assert refused.value.code == "queue_full" and refused.value.status == 503
    assert refused.value.headers.get("Retry-After") == "2"
    mesh.final(W1, mesh.request_for(running))
    assert mesh.request_for(queued)["attempt"] == 1
    mesh.submit()  # room again
    assert mesh.scheduler.queue_depth() == 1


def test_a_job_is_tried_at_most_max_attempts_times():
    mesh = two_workers()
    rec = mesh.submit()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        req = mesh.request_for(rec)
        assert req["attempt"] == attempt
        mesh.error(mesh.where(req), req, "backend_restarted")
    err = error_of(mesh, rec)
    assert err.code == "no_worker" and f"failed {MAX_ATTEMPTS} times" in err.message
    assert len(mesh.requests()) == MAX_ATTEMPTS
    # Both workers have their slots back.
    a, b = mesh.submit(), mesh.submit()
    assert {mesh.where(mesh.request_for(a)), mesh.where(mesh.request_for(b))} == {W1, W2}
