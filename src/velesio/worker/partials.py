"""A running job's PARTIALs. The first piece goes at once; a piece that comes sooner than ``window_s``
after the last PARTIAL waits for the window to end and goes with the others that came meanwhile, in one
frame (PARTIAL ``chunks`` is a list, even of one piece: docs/protocol.md). A stream then costs the router,
the ZeroMQ threads and the client one wake-up per window instead of one per token; on two cores shared with
llama.cpp's threads every wake-up takes time from generation (docs/performance.md). The router still writes
one SSE event per piece."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

from velesio.mesh import messages
from velesio.mesh.protocol import Command

log = logging.getLogger("velesio.worker")


class Link(Protocol):
    """Where the PARTIALs go: in a backend process, the pipe to its worker (runner.py's ``_PipeLink``)."""

    def send(self, command: Command, body: Mapping[str, Any]) -> None: ...


class PartialBatch:
    """Thread-safe: pieces come from the job's thread, the window's end is a timer on the event loop."""

    def __init__(self, link: Link, job_id: str, attempt: int, window_s: float,
                 loop: asyncio.AbstractEventLoop):
        self.link, self.job_id, self.attempt = link, job_id, attempt
        self.window_s, self.loop = window_s, loop
        self._lock = threading.Lock()  # held while sending, so that PARTIALs keep their order
        self._pending: list[dict[str, Any]] = []
        self._last_sent = float("-inf")
        self._timer_due = False

    def add(self, chunk: dict[str, Any]) -> None:
        with self._lock:
            self._pending.append(chunk)
            now = time.monotonic()
            wait = self._last_sent + self.window_s - now
            if wait <= 0:
                self._send(now)
            elif not self._timer_due:
                self._timer_due = True
                try:
                    self.loop.call_soon_threadsafe(self.loop.call_later, wait, self.flush)
                except RuntimeError:  # the loop is closed: the worker is stopping
                    self._send(now)

    def flush(self) -> None:
        """Send what waits (the window's timer, and the job's thread before its FINAL)."""
        with self._lock:
            self._timer_due = False
            if self._pending:
                self._send(time.monotonic())

    def _send(self, now: float) -> None:
        chunks, self._pending = self._pending, []
        self._last_sent = now
        try:
            self.link.send(Command.PARTIAL, messages.partial(self.job_id, self.attempt, chunks))
        except (TypeError, ValueError) as exc:  # a piece msgpack cannot carry (a backend bug)
            log.error("job %s: dropping %d piece(s) that cannot be sent: %s", self.job_id, len(chunks), exc)
