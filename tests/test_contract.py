"""The typed contract between dialects and backends (velesio.mesh.params): every operation has one params
and one result type, both survive the wire, and the router runs without any backend code."""

from __future__ import annotations

import subprocess
import sys

import msgpack
import pytest

from velesio.mesh import protocol
from velesio.mesh.jobs import Job
from velesio.mesh.params import (
    PARAMS_BY_OP,
    RESULT_BY_OP,
    ImageParams,
    TextParams,
    TextResult,
    params_from_wire,
    result_from_wire,
    to_wire,
)


def test_every_operation_has_one_params_and_one_result_type():
    ops = set(protocol.TEXT_OPERATIONS) | set(protocol.IMAGE_OPERATIONS)
    assert set(PARAMS_BY_OP) == ops and set(RESULT_BY_OP) == ops


def test_a_job_survives_the_wire_with_its_types():
    job = Job(op="img2img", model="m", params=ImageParams(prompt="p", init_images=[b"\x89PNG..."], mask=b"m"))
    wire = msgpack.unpackb(msgpack.packb(job.to_wire(seq=3), use_bin_type=True), raw=False)
    back = Job.from_wire(wire)
    assert back.params == job.params and isinstance(back.params, ImageParams)
    assert back.id == job.id and back.op == "img2img"


@pytest.mark.parametrize("op", sorted(PARAMS_BY_OP))
def test_defaults_apply_and_unknown_fields_are_dropped(op):
    params = params_from_wire(op, {"a_field_from_a_newer_router": 1})
    assert params == PARAMS_BY_OP[op]()
    result = result_from_wire(op, {"a_field_from_a_newer_worker": 1})
    assert result == RESULT_BY_OP[op]()


def test_text_result_round_trip():
    result = TextResult.timed(text="hi", finish_reason="stop", stop_type="word", stopping_word="\n",
                              prompt_tokens=3, completion_tokens=1, prompt_ms=1.23456, predicted_ms=2.0, seed=7)
    assert result.prompt_ms == 1.235
    assert result_from_wire("chat", to_wire(result)) == result


def test_an_unknown_operation_is_refused():
    with pytest.raises(ValueError):
        params_from_wire("txt2video", {})
    with pytest.raises(ValueError):
        Job.from_wire({"id": "j-1", "op": "txt2video", "model": "m", "params": {}})


def test_text_params_are_mutable_for_failover():
    params = TextParams(prompt="x", max_tokens=10)
    params.resume_text, params.max_tokens = "ab", 8
    assert to_wire(params)["resume_text"] == "ab" and to_wire(params)["max_tokens"] == 8


def test_the_router_runs_without_backend_or_worker_code():
    code = ("import sys, velesio.router.app\n"
            "bad = sorted(m for m in sys.modules if m.startswith(('velesio.backends', 'velesio.worker', 'torch', "
            "'llama_cpp', 'diffusers')))\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
