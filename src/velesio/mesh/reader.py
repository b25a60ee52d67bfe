"""Reading a ZeroMQ socket from an asyncio event loop without pyzmq's asyncio layer.

The loop watches the socket's file descriptor and, when it fires, reads every message that has arrived,
a batch at a time, with no Future and no loop turn per message (a stream brings thousands a second).
ZeroMQ's descriptor is edge-triggered: it fires once when messages arrive and not again until they have
been read, and any use of the socket (a send, a look at ZMQ_EVENTS) may consume that edge. So reading goes
on until the socket has nothing left, and whoever uses the socket in between calls ``schedule()`` when
ZMQ_EVENTS shows messages waiting. Used by the router's broker and by the worker's router links."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

RECV_BATCH = 256  # messages read in one go before the event loop gives others a turn


class SocketReader:
    """``read_one()`` reads and handles one message, and returns False when the socket had none."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_one: Callable[[], bool]):
        self.loop = loop
        self.read_one = read_one
        self._scheduled = False
        self._fd: int | None = None

    def watch(self, fd: int) -> None:
        self.unwatch()
        self._fd = fd
        self.loop.add_reader(fd, self.read)
        self.schedule()  # messages may be waiting already, and the edge is not raised again for them

    def unwatch(self) -> None:
        if self._fd is not None:
            self.loop.remove_reader(self._fd)
            self._fd = None

    def schedule(self) -> None:
        """Read on the next loop turn (from the event loop's thread)."""
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.read)

    def read(self) -> None:
        self._scheduled = False
        for _ in range(RECV_BATCH):
            if not self.read_one():
                return  # nothing left: ZeroMQ raises the descriptor's edge for the next message
        self.schedule()
