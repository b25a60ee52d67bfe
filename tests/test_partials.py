"""Stream pieces sent together within a window (worker/partials.py, docs/protocol.md "PARTIAL chunks"):
what a router receives from a real worker, that routers and workers of protocol 1.x are refused, and what
an SSE client receives end to end."""

from __future__ import annotations

import asyncio
import json
import time

import msgpack

from conftest import SMOLLM2, FakeRouter, raw_post
from velesio.mesh import protocol
from velesio.mesh.protocol import Command
from velesio.testing.mesh import FakeMesh
from velesio.worker.partials import PartialBatch

GENERATE = {"prompt": "Write a long story about a dragon:", "max_tokens": 48, "temperature": 0.8,
            "ignore_eos": True}


class Recorder:
    """Stands where a RouterLink stands: keeps what would be sent."""

    def __init__(self) -> None:
        self.sent: list[dict] = []

    def send(self, command, body) -> None:
        self.sent.append(body)


async def test_first_piece_goes_at_once_then_one_frame_per_window():
    link = Recorder()
    batch = PartialBatch(link, "j-1", 1, 0.05, asyncio.get_running_loop())
    batch.add({"text": "a"})
    assert link.sent == [{"job": "j-1", "attempt": 1, "chunks": [{"text": "a"}]}]
    batch.add({"text": "b"})
    batch.add({"text": "c"})
    assert len(link.sent) == 1  # inside the window: they wait
    await asyncio.sleep(0.15)
    assert link.sent[1] == {"job": "j-1", "attempt": 1, "chunks": [{"text": "b"}, {"text": "c"}]}
    batch.add({"text": "d"})  # the window after the last PARTIAL is over: at once
    assert link.sent[2]["chunks"] == [{"text": "d"}]
    batch.add({"text": "e"})
    batch.flush()  # the job's end: what waits goes now, and the timer finds nothing left
    await asyncio.sleep(0.1)
    assert [b["chunks"] for b in link.sent[3:]] == [[{"text": "e"}]]


async def test_window_zero_sends_every_piece():
    link = Recorder()
    batch = PartialBatch(link, "j-2", 1, 0.0, asyncio.get_running_loop())
    for piece in "abc":
        batch.add({"text": piece})
    assert [b["chunks"] for b in link.sent] == [[{"text": "a"}], [{"text": "b"}], [{"text": "c"}]]


def _fake_router(start_worker, name: str, version: str, window_ms: int):
    """A real worker on SmolLM2 under a fake router: the READY it sent, after the fake answered WELCOME
    ``version``."""
    router = FakeRouter(timeout_ms=60000)
    fake = router.sock
    proc = start_worker(router, name, [SMOLLM2], wait=False, worker_cfg={"partial_window_ms": window_ms})
    identity, frame = fake.recv_multipart()
    command, ready = msgpack.unpackb(frame)
    assert command == Command.READY and ready["version"] == protocol.VERSION
    fake.send_multipart([identity, msgpack.packb([2, {"version": version, "router": "fake",
                                                      "heartbeat_ms": 750, "liveness": 3}])])
    return fake, proc, identity


def _fake_router_stream(start_worker, name: str, window_ms: int) -> tuple[list[dict], dict]:
    """One streamed job under a fake router of this version; the PARTIAL bodies and the FINAL body."""
    fake, proc, identity = _fake_router(start_worker, name, protocol.VERSION, window_ms)
    try:
        job = {"id": "j-partials", "attempt": 1, "op": "completion", "model": SMOLLM2["name"], "stream": True,
               "params": GENERATE, "seq": 1}
        fake.send_multipart([identity, msgpack.packb([4, job])])
        partials = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            # A router that is alive: a worker that hears nothing for 2.25 s reconnects (and greets again).
            fake.send_multipart([identity, msgpack.packb([3, {}])])
            if not fake.poll(250):
                continue
            command, body = msgpack.unpackb(fake.recv_multipart()[1])
            if command == 3:  # heartbeat
                continue
            if command == 5:
                partials.append(body)
                continue
            assert command == 6, (command, body)
            return partials, body
        raise AssertionError(f"no FINAL within 60 s; {len(partials)} PARTIALs")
    finally:
        fake.close()
        proc.stop()


def test_a_router_gets_pieces_together_and_all_of_them(start_worker):
    partials, final = _fake_router_stream(start_worker, "batching", window_ms=200)
    assert partials and all(set(p) == {"job", "attempt", "chunks"} for p in partials)  # one shape: ``chunks``
    pieces = [c for p in partials for c in p["chunks"]]
    assert "".join(c["text"] for c in pieces) == final["result"]["text"]
    assert len(pieces) >= final["result"]["completion_tokens"] - 2  # a piece per token (bytes may merge)
    assert len(partials[0]["chunks"]) == 1  # the first piece at once
    assert any(len(p["chunks"]) > 1 for p in partials)
    assert len(partials) < len(pieces)


def test_a_router_speaking_1_x_is_refused(start_worker):
    """A router of protocol 1.x (which read PARTIAL ``chunk``) and this worker refuse each other."""
    # The router refuses a 1.x worker's READY ...
    mesh = FakeMesh()
    mesh.join(b"old-worker", version="1.2")
    assert not mesh.scheduler.workers
    refusal = mesh.frames(Command.DISCONNECT, b"old-worker")[-1].body
    assert refusal["reason"] == protocol.REASON_VERSION and refusal["version"] == protocol.VERSION
    # ... and the worker refuses a 1.x router's WELCOME: DISCONNECT version, no job taken.
    fake, proc, identity = _fake_router(start_worker, "new-worker", "1.1", window_ms=200)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert fake.poll(30000), "the worker said nothing"
            command, body = msgpack.unpackb(fake.recv_multipart()[1])
            if command == Command.DISCONNECT:
                assert body["reason"] == protocol.REASON_VERSION and body["version"] == protocol.VERSION
                assert "1.1" in body["message"]
                break
            assert command in (Command.READY, Command.HEARTBEAT), (command, body)
        else:
            raise AssertionError("no DISCONNECT version within 30 s")
    finally:
        fake.close()
        proc.stop()


def test_clients_still_get_one_event_per_token(start_router, start_worker):
    """Through a real router: every piece is its own SSE event in its own HTTP chunk, in order."""
    router = start_router()
    start_worker(router, "batching-e2e", [SMOLLM2], worker_cfg={"partial_window_ms": 200})
    body = json.dumps({"prompt": GENERATE["prompt"], "n_predict": 48, "ignore_eos": True, "stream": True}).encode()
    status, _headers, chunks = raw_post(router, "/completion", body, {**router.headers,
                                                                      "Content-Type": "application/json"})
    assert status == 200
    events = []
    for chunk in chunks:
        assert chunk.startswith(b"data: ") and chunk.endswith(b"\n\n") and chunk.count(b"\n\n") == 1, chunk
        events.append(json.loads(chunk[6:]))
    assert events[-1]["stop"] is True and events[-1]["tokens_predicted"] == 48
    assert len(events) >= 48 - 2 + 1
    assert [e["tokens_predicted"] for e in events[:-1]] == list(range(1, len(events)))
