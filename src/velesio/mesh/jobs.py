"""The one internal job model. Every HTTP dialect is translated into a Job at the edge; the scheduler,
the mesh and the backends see nothing else."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

from . import messages
from .params import Params, params_from_wire, to_wire


def new_job_id() -> str:
    return "j-" + os.urandom(16).hex()  # 128 random bits, as uuid4().hex, without building a UUID


@dataclasses.dataclass
class Job:
    op: str  # one of mesh.protocol.TEXT_OPERATIONS / IMAGE_OPERATIONS
    model: str
    params: Params  # the op's type in mesh/params.py (TextParams for completion and chat, ...)
    stream: bool = False
    id: str = dataclasses.field(default_factory=new_job_id)
    attempt: int = 1
    exclusive: bool = False  # run alone in its backend (a job retried after a crash it shared with others)

    def to_wire(self, seq: int | None = None) -> messages.Request:
        """The REQUEST body (``seq``: the worker registration's REQUEST number)."""
        return messages.request(self.id, self.attempt, self.op, self.model, self.stream, to_wire(self.params),
                                exclusive=self.exclusive, seq=seq)

    @classmethod
    def from_wire(cls, body: Mapping[str, Any]) -> Job:
        """The job of a REQUEST body; ValueError for an operation this version does not know."""
        op = str(body["op"])
        return cls(op=op, model=str(body["model"]), params=params_from_wire(op, body.get("params") or {}),
                   stream=bool(body.get("stream")), id=str(body["id"]), attempt=int(body.get("attempt", 1)),
                   exclusive=bool(body.get("exclusive")))
