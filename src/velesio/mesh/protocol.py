"""Protocol constants: command values, version and heartbeat timing (docs/protocol.md)."""

from __future__ import annotations

import enum

VERSION = "1.2"  # 1.1: PARTIAL may carry several pieces as ``chunks``; 1.2: backend processes (crashes, exclusive)
MAJOR = VERSION.split(".")[0]


class Command(enum.IntEnum):
    READY = 1
    WELCOME = 2
    HEARTBEAT = 3
    REQUEST = 4
    PARTIAL = 5
    FINAL = 6
    ERROR = 7
    CANCEL = 8
    DISCONNECT = 9


# A peer silent for HEARTBEAT_MS * LIVENESS is dead: 750 ms * 3 = 2.25 s, checked four times per interval,
# so a dead worker is noticed in under 3 s.
HEARTBEAT_MS = 750
LIVENESS = 3

# Worker reconnect backoff after losing the router.
RECONNECT_MIN_S = 0.25
RECONNECT_MAX_S = 1.0  # keeps re-registration after a router restart under 2 s

# Operations a job can ask for. Backends declare the subset they serve; the router routes on them.
TEXT_OPERATIONS = ("completion", "chat", "tokenize", "detokenize", "apply_template", "embeddings")
IMAGE_OPERATIONS = ("txt2img", "img2img")

# The error codes a backend may raise (``velesio.backends.BackendError.code``, one exception class each), all
# of them codes the router knows (router/errors.py). A backend process reports any other code, and any other
# exception, as ``internal_error`` (worker/runner.py). Besides these, ERROR may carry the worker's own codes
# (``busy``, ``backend_restarted``, ``backend_crashed``), which the router reads as failover or crash reports.
ERROR_CODES = ("invalid_request", "not_supported", "context_exceeded", "cancelled", "internal_error")

# Reasons carried by DISCONNECT.
REASON_UNKNOWN = "unknown"  # router does not know this worker: send READY again now
REASON_VERSION = "version"  # incompatible major version
REASON_SHUTDOWN = "shutdown"  # the peer is going away
REASON_LEAVING = "leaving"  # worker leaves after draining


def compatible(version: object) -> bool:
    """True when a peer's VERSION (whatever it sent) is a string with our major version."""
    return isinstance(version, str) and version.split(".")[0] == MAJOR


def minor(version: object) -> int:
    """The minor number of a compatible peer's VERSION (0 when it cannot be read)."""
    try:
        return int(str(version).split(".")[1])
    except (IndexError, ValueError):
        return 0


PARTIAL_CHUNKS_MINOR = 1  # routers from 1.1 read PARTIAL ``chunks``; a worker sends one piece each to older ones
PARTIAL_WINDOW_MS = 50  # a worker's default window for sending a stream's pieces together (worker/partials.py)
