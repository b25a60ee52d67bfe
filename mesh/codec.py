"""One frame per message: msgpack ``[command, body]``. Decoding never raises anything but DecodeError."""

from __future__ import annotations

from typing import Any

import msgpack

from .protocol import Command


class DecodeError(ValueError):
    """A frame that is not a valid VMP message."""


def encode(command: Command, body: dict[str, Any] | None = None) -> bytes:
    return msgpack.packb([int(command), body or {}], use_bin_type=True)


def decode(frame: bytes) -> tuple[Command, dict[str, Any]]:
    try:
        command, body = msgpack.unpackb(frame, raw=False, strict_map_key=True)
        return Command(command), body if isinstance(body, dict) else {}
    except Exception as exc:  # malformed msgpack, wrong arity, unknown command
        raise DecodeError(f"bad frame ({len(frame)} bytes): {exc}") from None
