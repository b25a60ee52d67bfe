"""Protocol constants: command values, version, error codes and heartbeat timing (docs/protocol.md). The
message bodies and their constructors are in ``messages.py``."""

from __future__ import annotations

import enum

# 2.0: PARTIAL always carries ``chunks`` (a list); a 1.x peer is refused. 2.1: models loaded, unloaded and
# resized at run time (LOAD, UNLOAD, UPDATE, REPLY; a worker announces itself again when its models change).
VERSION = "2.1"
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
    LOAD = 10
    UNLOAD = 11
    UPDATE = 12
    REPLY = 13


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
# exception, as ``internal_error`` (worker/runner.py).
ERROR_CODES = ("invalid_request", "not_supported", "context_exceeded", "cancelled", "internal_error")

# The mesh's own codes: sent in ERROR by a worker (``busy``, ``backend_crashed``, ``backend_restarted``,
# ``timeout``, ``model_not_found``), which the router reads as failover or crash reports, or given by the
# router to a job no worker can take (``no_worker``).
MESH_ERROR_CODES = ("busy", "backend_crashed", "backend_restarted", "timeout", "model_not_found",
                    "insufficient_memory", "no_worker")

# Reasons carried by DISCONNECT.
REASON_UNKNOWN = "unknown"  # router does not know this worker: send READY again now
REASON_VERSION = "version"  # incompatible major version
REASON_SHUTDOWN = "shutdown"  # the peer is going away
REASON_LEAVING = "leaving"  # worker leaves after draining


# The codes a REPLY to LOAD, UNLOAD or UPDATE may carry when it failed (docs/protocol.md "Models at run time").
REPLY_CODES = ("invalid_request", "model_not_found", "conflict", "insufficient_memory", "load_failed")

# The first minor version of major 2 that knows LOAD, UNLOAD and UPDATE: a router sends them to no older worker.
MODELS_AT_RUN_TIME = (2, 1)


def compatible(version: object) -> bool:
    """True when a peer's VERSION (whatever it sent) is a string with our major version."""
    return isinstance(version, str) and version.split(".")[0] == MAJOR


def version_tuple(version: object) -> tuple[int, int]:
    """``"2.1"`` as ``(2, 1)``; ``(0, 0)`` for anything that is not ``MAJOR.MINOR``."""
    try:
        major, minor = str(version).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return 0, 0


PARTIAL_WINDOW_MS = 50  # a worker's default window for sending a stream's pieces together (worker/partials.py)
