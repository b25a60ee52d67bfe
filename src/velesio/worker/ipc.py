"""The pipe between a worker and each backend process it supervises (worker/supervisor.py, worker/runner.py).

A Unix socket pair carries msgpack arrays back to back (msgpack is self-delimiting, so no length prefix):
``[kind, ...]``. The worker sends LOAD once, then RUN / CANCEL / THREADS / STOP; the backend process
answers LOADED or LOAD_FAILED, then for each job any number of OUT and PROGRESS messages and one END.
OUT and END carry a finished mesh frame (PARTIAL, FINAL or ERROR, mesh/codec.py) that the worker forwards
to the job's router as it is, so a token costs the worker no decoding and a stream's pieces cross the
pipe already batched by the backend process's PARTIAL window."""

from __future__ import annotations

import os
import select
import socket
import threading
from typing import Any

import msgpack

# worker -> backend process
LOAD = 1  # [LOAD, model config dict, backend "module:qualname", threads]
RUN = 2  # [RUN, key, job wire dict, partial window in seconds]
CANCEL = 3  # [CANCEL, key, keep partial]
THREADS = 4  # [THREADS, n]: the worker's CPU share changed
STOP = 5  # [STOP]: close the backend and exit

# backend process -> worker
LOADED = 11  # [LOADED, meta dict, operations]
LOAD_FAILED = 12  # [LOAD_FAILED, reason]
OUT = 13  # [OUT, key, PARTIAL frame]
PROGRESS = 14  # [PROGRESS, key, pieces so far] (a job that does not stream still shows it is moving)
END = 15  # [END, key, FINAL or ERROR frame, outcome]

# A job's result may carry images: the largest message the worker accepts from a backend process.
MAX_MESSAGE = 1 << 30


def pack(message: list[Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpacker() -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE)


class BlockingPipe:
    """The backend process's end: messages are sent whole from any thread (job threads, the reader), each
    send waiting while the pipe is full. The event loop that reads the socket makes it non-blocking (libuv
    does for any descriptor it watches), so a full pipe is waited out here rather than by ``sendall``."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._lock = threading.Lock()

    def send(self, message: list[Any]) -> None:
        data = memoryview(pack(message))
        with self._lock:
            while data:
                try:
                    data = data[self.sock.send(data):]
                except BlockingIOError:
                    select.select([], [self.sock], [])
                except OSError:  # the worker is gone: so is the reason to go on
                    os._exit(0)
