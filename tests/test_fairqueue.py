"""Fair share between tokens within a model's queue (router/fairqueue.py), with a clock moved by hand."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from velesio.router.fairqueue import FairQueue
from velesio.testing.mesh import FakeClock

_ids = itertools.count()


@dataclasses.dataclass(eq=False)
class Job:
    tenant: str
    priority: int = 0
    weight: float = 1.0
    queued_at: float = 0.0
    n: int = dataclasses.field(default_factory=lambda: next(_ids))


def fill(q: FairQueue, clock: FakeClock, tenant: str, count: int, **kw) -> list[Job]:
    jobs = [Job(tenant, queued_at=clock(), **kw) for _ in range(count)]
    for job in jobs:
        q.append(job)
    return jobs


def served(q: FairQueue, count: int) -> list[str]:
    return [q.popleft().tenant for _ in range(count)]


def test_weights_share_the_slots():
    clock = FakeClock()
    q = FairQueue(clock)
    fill(q, clock, "a", 60, weight=2.0)
    fill(q, clock, "b", 60, weight=1.0)
    first = served(q, 30)
    assert first.count("a") == 20 and first.count("b") == 10


def test_a_flood_does_not_hold_back_a_newcomer():
    clock = FakeClock()
    q = FairQueue(clock)
    fill(q, clock, "flood", 200)
    served(q, 50)
    newcomer = fill(q, clock, "b", 1)[0]
    assert [q.popleft() for _ in range(2)].count(newcomer) == 1
    assert len(q) == 149


def test_idle_time_is_no_credit():
    clock = FakeClock()
    q = FairQueue(clock)
    fill(q, clock, "a", 100)
    served(q, 90)  # b was idle all along
    fill(q, clock, "b", 10)
    order = served(q, 20)
    assert max(len(list(run)) for _, run in itertools.groupby(order)) <= 2  # alternating, not ten b in a row


def test_priority_goes_first_and_ageing_ends_starvation():
    clock = FakeClock()
    q = FairQueue(clock, aging_s=30.0)
    low = fill(q, clock, "batch", 1, priority=-1)[0]
    fill(q, clock, "game", 50, priority=1)
    assert served(q, 5) == ["game"] * 5
    clock.advance(30.0)  # batch's job gains a level: still below the game's
    assert served(q, 5) == ["game"] * 5
    clock.advance(30.0)  # two levels: it competes with the game's jobs by weight
    assert low in [q.popleft() for _ in range(2)]


def test_ageing_does_not_lift_a_flood_over_a_fresh_equal():
    clock = FakeClock()
    q = FairQueue(clock, aging_s=1.0)
    fill(q, clock, "flood", 100)
    clock.advance(60.0)  # the flood's jobs are old; b's is fresh, at the same priority
    fill(q, clock, "b", 1)
    assert "b" in served(q, 2)


def test_failover_first_then_fair_order_and_iteration_matches():
    clock = FakeClock()
    q = FairQueue(clock)
    fill(q, clock, "a", 3, weight=2.0)
    fill(q, clock, "b", 3)
    moved = Job("c")
    q.appendleft(moved)
    assert q.peek() is moved
    planned = list(q)
    assert planned[0] is moved and len(planned) == len(q) == 7
    assert [q.popleft() for _ in range(7)] == planned
    with pytest.raises(IndexError):
        q.popleft()


def test_remove_and_contains():
    clock = FakeClock()
    q = FairQueue(clock)
    a = fill(q, clock, "a", 2)
    assert a[1] in q and len(q) == 2
    q.remove(a[1])
    assert a[1] not in q and len(q) == 1 and q.popleft() is a[0] and not q
    with pytest.raises(ValueError):
        q.remove(a[0])
