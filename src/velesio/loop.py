"""The event loop both commands run on: uvloop when installed (the `speed` extra), else asyncio's own.
``VELESIO_LOOP=asyncio`` in the environment keeps asyncio's loop even with uvloop installed."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any


def name() -> str:
    """The loop ``run`` uses here: "uvloop" or "asyncio"."""
    if os.environ.get("VELESIO_LOOP", "").strip().lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, Any]) -> Any:
    if name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
