"""Logging set-up shared by router and worker: plain lines, or JSON lines for log collectors.

Lines below WARNING are written into the stream's buffer and flushed by a background thread every
``FLUSH_INTERVAL_S``; warnings and errors are flushed at once. A line per job therefore costs no system
call, and in the worker no hand-over of the GIL from a job thread to the event loop in the middle of a job
(a write releases the GIL): about a tenth more requests/s through the mesh (docs/performance.md)."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import weakref
from typing import TextIO

FLUSH_INTERVAL_S = 0.1


class _SecondCache:
    """``strftime`` of the current second, computed once per second instead of once per line. Job threads
    log too: the second and its text are one tuple, replaced in one assignment, so no thread reads a new
    second with the previous one's text."""

    def __init__(self, fmt: str, convert) -> None:
        self.fmt, self.convert = fmt, convert
        self._cached: tuple[int, str] = (-1, "")

    def __call__(self, created: float) -> str:
        second = int(created)
        cached = self._cached
        if cached[0] != second:
            cached = self._cached = (second, time.strftime(self.fmt, self.convert(second)))
        return cached[1]


class Lines(logging.Formatter):
    """``%(asctime)s %(levelname)s %(name)s: %(message)s``, the date formatted once per second."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = _SecondCache(self.default_time_format, time.localtime)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._second(record.created)},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        # The line of a record without a traceback built directly: a third of the cost of the generic
        # path (a %-format of the record's whole __dict__), the same text.
        if record.exc_info or record.exc_text or record.stack_info:
            return super().format(record)
        record.message = record.getMessage()
        return f"{self.formatTime(record)} {record.levelname} {record.name}: {record.message}"


class JsonLines(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = _SecondCache("%Y-%m-%dT%H:%M:%S", time.gmtime)

    def format(self, record: logging.LogRecord) -> str:
        entry = {"ts": f"{self._second(record.created)}.{int(record.msecs):03d}Z",
                 "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        for key in ("job", "worker", "token_name"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class BatchedStreamHandler(logging.StreamHandler):
    """A StreamHandler that flushes at once only for WARNING and above (see the module docstring)."""

    _all: weakref.WeakSet[BatchedStreamHandler] = weakref.WeakSet()
    _flusher: threading.Thread | None = None
    _guard = threading.Lock()

    def __init__(self, stream) -> None:
        super().__init__(stream)
        with self._guard:
            BatchedStreamHandler._all.add(self)
            if BatchedStreamHandler._flusher is None:
                BatchedStreamHandler._flusher = threading.Thread(target=self._flush_all, name="log-flush",
                                                                 daemon=True)
                BatchedStreamHandler._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
            if record.levelno >= logging.WARNING:
                self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    @classmethod
    def _flush_all(cls) -> None:
        while True:
            time.sleep(FLUSH_INTERVAL_S)
            for handler in list(cls._all):
                try:
                    handler.flush()
                except Exception:  # a closed stream: nothing to flush
                    pass


def setup_logging(level: str = "INFO", json_lines: bool = False) -> None:
    # Neither format shows the caller's file, thread or process: do not collect them for every record
    # (the logging HOWTO's "Optimization"; finding the caller walks the stack on each line).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # Log to a duplicate of stderr's descriptor: llama-cpp-python silences model loading by pointing fd 2
    # at /dev/null for a moment, which would swallow what other threads log meanwhile.
    stream: TextIO
    try:
        stream = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1 << 16, encoding="utf-8", errors="replace")
    except (OSError, ValueError, AttributeError):
        stream = sys.stderr
    handler = BatchedStreamHandler(stream)
    handler.setFormatter(JsonLines() if json_lines else Lines())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

