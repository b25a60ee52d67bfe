"""One frame per message: msgpack ``[command, body]``. Decoding never raises anything but DecodeError."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgpack

from .protocol import Command

# Frames smaller than this are copied into ZeroMQ when sent (cheaper than tracking zero-copy buffers).
COPY_THRESHOLD = 65536


class DecodeError(ValueError):
    """A frame that is not a valid VMP message."""


# Command by value: a dict lookup costs a fraction of ``Command(value)`` on every frame of a stream.
_COMMANDS: dict[int, Command] = {int(c): c for c in Command}


def encode(command: Command, body: Mapping[str, Any] | None = None) -> bytes:
    """``body``: one of messages.py's bodies (None: ``{}``)."""
    return msgpack.packb([int(command), body or {}], use_bin_type=True)


def decode(frame: bytes) -> tuple[Command, dict[str, Any]]:
    try:
        command, body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
        return _COMMANDS[command], body if isinstance(body, dict) else {}
    except Exception as exc:  # malformed msgpack, wrong arity, unknown command
        reason = f"{exc.args[0]!r} is not a valid Command" if isinstance(exc, KeyError) else exc
        raise DecodeError(f"bad frame ({len(frame)} bytes): {reason}") from None
