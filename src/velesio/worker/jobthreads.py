"""The threads jobs run on: a backend's ``run()`` blocks, so each running job has a thread of its own.
Threads are started on demand and kept; an idle one waits on its own queue, and the one that went idle
last takes the next job. Lighter than a ThreadPoolExecutor on the per-job path: no Future and no work
item per job (the worker sends each job's one result from the job's thread itself)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("velesio.worker")


class JobThreads:
    def __init__(self, name: str = "job"):
        self.name = name
        self._idle: list[queue.SimpleQueue] = []  # the inboxes of idle threads, the most recent last
        self._lock = threading.Lock()
        self._started = 0
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the job threads are shut down")
            inbox = self._idle.pop() if self._idle else None
            if inbox is None:
                inbox = queue.SimpleQueue()
                self._started += 1
                threading.Thread(target=self._serve, args=(inbox,), name=f"{self.name}-{self._started}",
                                 daemon=True).start()
        inbox.put((fn, args))

    def _serve(self, inbox: queue.SimpleQueue) -> None:
        while True:
            item = inbox.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)
            except BaseException:  # noqa: BLE001 - a task's own errors are its own; the thread stays
                log.exception("a job thread's task failed")
            with self._lock:
                if self._closed:
                    return
                self._idle.append(inbox)

    def shutdown(self) -> None:
        """Idle threads end now, busy ones when their job returns; nothing waits for them."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for inbox in idle:
            inbox.put(None)
