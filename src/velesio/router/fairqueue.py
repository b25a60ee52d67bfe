"""One model's waiting jobs, served in weighted fair order between API tokens, by priority, with ageing.

- **Fair share** (stride scheduling): each token ("tenant") has a *pass*; the next job comes from the
  waiting tenant with the lowest pass, whose pass then grows by ``1 / weight``. A tenant of weight 2 is so
  served twice as often as one of weight 1 while both wait; one that floods the queue gets its share, not
  the queue. A tenant that starts waiting again cannot spend credit saved while it was idle: its pass
  starts at least at the pass of the last job served.
- **Priority**: a tenant's head job of a higher priority goes first. A request may lower its priority
  (``X-Priority``), never raise it above its token's (router/admission.py).
- **Ageing**: a job gains one priority level per ``aging_s`` seconds waited, up to the highest priority
  waiting, so a low-priority job is never starved: once it has waited long enough it competes by weight
  with the others.
- **Failover first**: a job that was already running and lost its worker (``appendleft``) goes before all.

``len``, ``in``, ``remove`` and iteration (in the order the jobs would be served now) are what the scheduler
and the status routes use."""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator
from typing import Protocol


class Queued(Protocol):
    tenant: str
    priority: int
    weight: float
    queued_at: float  # the clock's time when it was queued


class _Tenant:
    __slots__ = ("jobs", "pass_", "weight")

    def __init__(self, weight: float):
        self.jobs: collections.deque[Queued] = collections.deque()
        self.pass_ = 0.0
        self.weight = weight


class FairQueue:
    def __init__(self, clock: Callable[[], float], aging_s: float = 30.0):
        self.clock = clock
        self.aging_s = aging_s
        self._first: collections.deque[Queued] = collections.deque()  # failover jobs, before all
        self._tenants: dict[str, _Tenant] = {}
        self._served_pass = 0.0  # the pass of the last job served
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def __contains__(self, job: object) -> bool:
        return any(job in q for q in self._queues())

    def _queues(self) -> Iterator[collections.deque[Queued]]:
        yield self._first
        for tenant in self._tenants.values():
            yield tenant.jobs

    def append(self, job: Queued) -> None:
        tenant = self._tenants.get(job.tenant)
        if tenant is None:
            tenant = self._tenants[job.tenant] = _Tenant(job.weight)
        if not tenant.jobs:  # starts waiting again: no credit saved while idle
            tenant.pass_ = max(tenant.pass_, self._served_pass)
        tenant.weight = job.weight
        tenant.jobs.append(job)
        self._len += 1

    def appendleft(self, job: Queued) -> None:
        """A job to run before every other (it already ran and lost its worker)."""
        self._first.appendleft(job)
        self._len += 1

    def remove(self, job: Queued) -> None:
        for q in self._queues():
            if job in q:
                q.remove(job)
                self._len -= 1
                self._forget_idle()
                return
        raise ValueError("job not queued")

    def clear(self) -> None:
        self._first.clear()
        self._tenants.clear()
        self._len = 0

    def _level(self, job: Queued, now: float, top: int) -> int:
        aged = math.floor(max(0.0, now - job.queued_at) / self.aging_s) if self.aging_s > 0 else 0
        return min(top, job.priority + aged) if aged else job.priority

    def _next_tenant(self, tenants: dict[str, _Tenant], passes: dict[str, float], now: float) -> str | None:
        waiting = [(name, t) for name, t in tenants.items() if t.jobs]
        if not waiting:
            return None
        top = max(t.jobs[0].priority for _, t in waiting)
        return min(waiting, key=lambda nt: (-self._level(nt[1].jobs[0], now, top), passes[nt[0]]))[0]

    def peek(self) -> Queued | None:
        """The job that would be served next."""
        if self._first:
            return self._first[0]
        name = self._next_tenant(self._tenants, {n: t.pass_ for n, t in self._tenants.items()}, self.clock())
        return None if name is None else self._tenants[name].jobs[0]

    def popleft(self) -> Queued:
        if self._first:
            self._len -= 1
            return self._first.popleft()
        name = self._next_tenant(self._tenants, {n: t.pass_ for n, t in self._tenants.items()}, self.clock())
        if name is None:
            raise IndexError("pop from an empty queue")
        tenant = self._tenants[name]
        job = tenant.jobs.popleft()
        self._served_pass = tenant.pass_
        tenant.pass_ += 1.0 / max(tenant.weight, 1e-6)
        self._len -= 1
        self._forget_idle()
        return job

    def take(self, job: Queued) -> None:
        """Remove ``job`` as served now: the head (``popleft``), or one further on that the scheduler chose
        for its cache, charged to its tenant as if it had been its turn."""
        if self._first and self._first[0] is job:
            self.popleft()
            return
        if job in self._first:
            self._first.remove(job)
            self._len -= 1
            return
        tenant = self._tenants.get(job.tenant)
        if tenant is None or job not in tenant.jobs:
            raise ValueError("job not queued")
        tenant.jobs.remove(job)
        self._served_pass = max(self._served_pass, tenant.pass_)
        tenant.pass_ += 1.0 / max(tenant.weight, 1e-6)
        self._len -= 1
        self._forget_idle()

    def _forget_idle(self) -> None:
        """Tenants with nothing waiting keep no state beyond their pass, and only while it is ahead of the
        pass served (a pass behind it would be raised on their next job anyway)."""
        for name in [n for n, t in self._tenants.items() if not t.jobs and t.pass_ <= self._served_pass]:
            del self._tenants[name]

    def __iter__(self) -> Iterator[Queued]:
        """The waiting jobs in the order they would be served if nothing else arrived."""
        yield from self._first
        tenants = {n: _Tenant(t.weight) for n, t in self._tenants.items()}
        for n, t in tenants.items():
            t.jobs = collections.deque(self._tenants[n].jobs)
        passes = {n: t.pass_ for n, t in self._tenants.items()}
        now = self.clock()
        while True:
            name = self._next_tenant(tenants, passes, now)
            if name is None:
                return
            yield tenants[name].jobs.popleft()
            passes[name] += 1.0 / max(tenants[name].weight, 1e-6)
