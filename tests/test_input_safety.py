"""Client input that native code would choke on ends in a clear 4xx, never a crashed process, and every
number that sizes an image computation is bounded. Real router and worker processes on loopback: a SmolLM2
text worker, and two tiny-sd image workers (one with the default job budget, one with a small one)."""

from __future__ import annotations

import base64
import io
import json
import os
import time
from typing import Any

import pytest
import requests

from conftest import SMOLLM2, sse_events
from velesio.mesh.limits import IMAGE_LIMITS, image_cost, img2img_steps
from velesio.mesh.params import ImageParams

TEXT_WORKER, IMAGE_WORKER, BUDGET_WORKER = "guard-text", "guard-img", "guard-img-budget"
TINY = {"name": "tiny-sd", "backend": "diffusers", "slots": 1}
# 64 x 64 x 4 steps x 2 images: a budget small enough to test with the tiny model on a CPU.
BUDGET = 64 * 64 * 4 * 2
TINY_BUDGET = {"name": "tiny-sd-budget", "backend": "diffusers", "slots": 1, "options": {"max_pixel_steps": BUDGET}}


# ---- process helpers ----------------------------------------------------------------------------------
def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def family(pid: int) -> set[int]:
    """A process and all its descendants (a worker and any backend processes it runs)."""
    tree, out, todo = _children(), set(), [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(tree.get(p, []))
    return out


def peak_rss_mb(pid: int) -> int:
    """The largest peak resident set (VmHWM) over a process and its descendants, in MiB."""
    peak = 0
    for p in family(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) // 1024)
        except OSError:
            pass
    return peak


def worker_summary(router, name: str) -> dict[str, Any]:
    return next(w for w in router.health()["workers"] if w["id"] == name)


def assert_error_shape(r: requests.Response, status_range=range(400, 500)) -> dict[str, Any]:
    assert r.status_code in status_range, r.text
    err = r.json()["error"]
    assert {"code", "message"} <= set(err), err
    return err


@pytest.fixture(scope="module")
def guarded(start_router, start_worker):
    """A router and a SmolLM2 text worker."""
    router = start_router()
    router.procs = {TEXT_WORKER: start_worker(router, TEXT_WORKER, [SMOLLM2], wait=False)}
    health = router.wait_for(lambda h: TEXT_WORKER in {w["id"] for w in h["workers"]}, timeout=120)
    assert not health["failures"], health["failures"]
    return router


@pytest.fixture(scope="module")
def imaging(guarded, start_worker):
    """The same router with two tiny-sd image workers: default limits, and a small max_pixel_steps."""
    pytest.importorskip("diffusers")
    pytest.importorskip("PIL")
    guarded.procs[IMAGE_WORKER] = start_worker(guarded, IMAGE_WORKER, [TINY], wait=False)
    guarded.procs[BUDGET_WORKER] = start_worker(guarded, BUDGET_WORKER, [TINY_BUDGET], wait=False)
    health = guarded.wait_for(lambda h: set(guarded.procs) <= {w["id"] for w in h["workers"]}, timeout=240)
    assert not health["failures"], health["failures"]
    return guarded


# ---- text: grammars llama.cpp would abort on ---------------------------------------------------------------
COMPLETE_BUT_NO_END = {"prompt": "x", "n_predict": 5, "grammar": 'root ::= "a"', "ignore_eos": True}
MATCHES_NOTHING = {"prompt": "x", "n_predict": 5, "grammar": "root ::= [^\\x00-\\U0010FFFF]"}
SCHEMA_NO_END = {"prompt": "x", "n_predict": 5, "json_schema": {"type": "boolean"}, "ignore_eos": True}


@pytest.mark.parametrize("body, words", [
    (COMPLETE_BUT_NO_END, ["grammar", "complete", "ignore_eos"]),
    (MATCHES_NOTHING, ["grammar", "no text matches"]),
    (SCHEMA_NO_END, ["json_schema", "complete", "ignore_eos"]),
], ids=["complete-but-ignore-eos", "matches-nothing", "json-schema-ignore-eos"])
def test_grammar_without_a_way_out_is_400_and_the_worker_lives(guarded, body, words):
    proc = guarded.procs[TEXT_WORKER]
    before = family(proc.popen.pid)
    r = guarded.post("/completion", body)
    err = assert_error_shape(r, [400])
    for word in words:
        assert word in err["message"], err
    # The same worker process (and backend processes, if any) serves the next request.
    ok = guarded.post("/completion", {"prompt": "Hello", "n_predict": 3})
    assert ok.status_code == 200, ok.text
    assert proc.alive() and family(proc.popen.pid) == before
    assert worker_summary(guarded, TEXT_WORKER)["status"] in ("idle", "busy")
    assert "terminate called" not in proc.log and "GGML_ASSERT" not in proc.log


def test_grammar_error_mid_stream_is_an_error_event(guarded):
    proc = guarded.procs[TEXT_WORKER]
    before = family(proc.popen.pid)
    r = requests.post(guarded.url + "/completion", json={**COMPLETE_BUT_NO_END, "stream": True},
                      headers=guarded.headers, stream=True, timeout=120)
    events = [json.loads(e) for e in sse_events(r)]
    assert events and events[-1]["error"]["code"] == 400
    assert "ignore_eos" in events[-1]["error"]["message"]
    assert proc.alive() and family(proc.popen.pid) == before


def test_json_schema_through_chat_completions(guarded):
    """/v1/chat/completions constrains with response_format; it has no ignore_eos (an unknown field is
    ignored), so the boolean schema ends normally, with JSON."""
    proc = guarded.procs[TEXT_WORKER]
    before = family(proc.popen.pid)
    fmt = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"type": "boolean"}}}
    r = guarded.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Is water wet?"}],
                                              "response_format": fmt, "ignore_eos": True, "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["choices"][0]["message"]["content"]) in (True, False)
    assert proc.alive() and family(proc.popen.pid) == before


def test_constrained_generation_still_works(guarded):
    r = guarded.post("/completion", {"prompt": "Pick a colour:", "n_predict": 8, "ignore_eos": True,
                                     "grammar": 'root ::= ("red" | "green" | "blue") " "*'})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["content"].strip() in ("red", "green", "blue")
    assert body["tokens_predicted"] == 8  # ignore_eos: the grammar allows spaces for ever, so it runs to the limit


# ---- images: denoising_strength, budgets, bounds ----------------------------------------------------------------
def _png(side: int = 64) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 120, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("strength", [1e-9, 1e-30, 5e-324])
def test_tiny_denoising_strength_runs_one_bounded_step(imaging, strength):
    proc = imaging.procs[IMAGE_WORKER]
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "init_images": [_png()], "model": "tiny-sd"}
    warm = imaging.post("/sdapi/v1/img2img", {**body, "denoising_strength": 0.75})
    assert warm.status_code == 200, warm.text
    baseline = peak_rss_mb(proc.popen.pid)
    started = time.monotonic()
    r = imaging.post("/sdapi/v1/img2img", {**body, "denoising_strength": strength})
    elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert len(r.json()["images"]) == 1
    assert any("smallest effective strength 1/150" in note for note in info["notes"]), info["notes"]
    # One step of a 150-step schedule: seconds and no memory to speak of (it was 1e9 steps and 23.8 GB).
    assert elapsed < 60
    assert peak_rss_mb(proc.popen.pid) < baseline + 512
    assert proc.alive()


def test_lcm_schedule_is_bounded_by_its_distillation_steps(imaging):
    """LCMScheduler raises mid-job beyond its 50-step distillation schedule: the worker refuses first."""
    r = imaging.post("/sdapi/v1/txt2img", {"prompt": "x", "width": 64, "height": 64, "steps": 51,
                                           "sampler_name": "LCM", "model": "tiny-sd"})
    err = assert_error_shape(r, [400])
    assert "LCM" in err["message"] and "50" in err["message"]
    r = imaging.post("/sdapi/v1/img2img", {"prompt": "x", "width": 64, "height": 64, "steps": 1, "sampler_name": "LCM",
                                           "init_images": [_png()], "denoising_strength": 1e-9, "model": "tiny-sd"})
    assert r.status_code == 200, r.text
    assert any("1/50" in note for note in json.loads(r.json()["info"])["notes"])


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_non_finite_denoising_strength_is_400(imaging, raw):
    body = json.dumps({"prompt": "x", "width": 64, "height": 64, "steps": 1, "init_images": [_png()],
                       "denoising_strength": 0.5}).encode().replace(b"0.5", raw)
    r = requests.post(imaging.url + "/sdapi/v1/img2img", data=body, timeout=60,
                      headers={**imaging.headers, "Content-Type": "application/json"})
    err = assert_error_shape(r, [400])
    assert err["param"] == "denoising_strength"


def test_job_over_the_default_budget_is_refused_before_dispatch(imaging):
    image = worker_summary(imaging, IMAGE_WORKER)
    queue_before = imaging.get("/queue/status").json()
    body = {"prompt": "x", "width": 1024, "height": 1024, "steps": 150, "batch_size": 8, "n_iter": 100,
            "model": "tiny-sd"}
    started = time.monotonic()
    r = imaging.post("/sdapi/v1/txt2img", body)
    err = assert_error_shape(r, [400])
    cost, limit = 1024 * 1024 * 150 * 8 * 100, 1024 * 1024 * 150
    assert limit == IMAGE_LIMITS["max_pixel_steps"]
    assert "max_pixel_steps" in err["message"] and str(cost) in err["message"] and str(limit) in err["message"]
    assert err["details"] == {"max_pixel_steps": limit, "cost": cost}
    assert time.monotonic() - started < 30
    # Nothing reached a worker.
    after = worker_summary(imaging, IMAGE_WORKER)
    assert after["status"] == "idle" and after["jobs_done"] == image["jobs_done"]
    queue_after = imaging.get("/queue/status").json()
    assert queue_after["running_jobs"] == 0 and queue_after["queue_depth"] == 0
    assert queue_after["completed_jobs_24h"] == queue_before["completed_jobs_24h"]


def test_model_budget_is_advertised_and_counts_the_steps_img2img_runs(imaging):
    models = {m["model_name"]: m for m in imaging.get("/sdapi/v1/sd-models").json()}
    assert "tiny-sd-budget" in models
    small = {"prompt": "x", "width": 64, "height": 64, "steps": 4, "model": "tiny-sd-budget"}
    ok = imaging.post("/sdapi/v1/txt2img", {**small, "batch_size": 2})  # exactly the budget
    assert ok.status_code == 200, ok.text
    before = worker_summary(imaging, BUDGET_WORKER)["jobs_done"]
    over = imaging.post("/sdapi/v1/txt2img", {**small, "batch_size": 3})
    err = assert_error_shape(over, [400])
    assert "max_pixel_steps" in err["message"] and str(BUDGET) in err["message"]
    assert str(64 * 64 * 4 * 3) in err["message"]
    assert worker_summary(imaging, BUDGET_WORKER)["jobs_done"] == before
    # img2img at strength 0.1 runs 2 of 20 steps: 64 x 64 x 2 x 2 images fits where txt2img's 20 steps do not.
    i2i = {**small, "steps": 20, "batch_size": 2, "init_images": [_png()], "denoising_strength": 0.1}
    assert imaging.post("/sdapi/v1/img2img", i2i).status_code == 200
    assert imaging.post("/sdapi/v1/txt2img", {**small, "steps": 20}).status_code == 400


@pytest.mark.parametrize("field, value", [("mask_blur", 257), ("mask_blur", -1), ("eta", 11), ("eta", -0.5)])
def test_other_sizing_numbers_are_bounded(imaging, field, value):
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "init_images": [_png()], "mask": _png(),
            field: value}
    err = assert_error_shape(imaging.post("/sdapi/v1/img2img", body), [400])
    assert err["param"] == field


def test_clip_skip_is_bounded(imaging):
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 1,
            "override_settings": {"CLIP_stop_at_last_layers": 13}}
    err = assert_error_shape(imaging.post("/sdapi/v1/txt2img", body), [400])
    assert err["param"] == "override_settings.CLIP_stop_at_last_layers"


# ---- the schedule arithmetic both sides share ----------------------------------------------------------------------
@pytest.mark.parametrize("max_steps", [1, 50, 150])
def test_img2img_schedule_is_bounded_for_every_strength(max_steps):
    strengths = [0.0, 5e-324, 1e-300, 1e-30, 1e-9, 1 / 150 - 1e-12, 1 / 150, 0.01, 0.05, 0.3, 0.5, 0.75, 0.999, 1.0]
    strengths += [i / 1000 for i in range(1001)]
    for steps in sorted({1, 2, 7, 20, max_steps}):
        if steps > max_steps:
            continue
        for strength in strengths:
            schedule, run = img2img_steps(steps, strength, max_steps)
            assert steps <= schedule <= max_steps and 0 <= run <= steps, (steps, strength, schedule, run)
            assert (run == 0) == (strength == 0)
            if int(steps * strength) >= 1:
                assert (schedule, run) == (steps, min(int(steps * strength), steps))  # diffusers' own count
            elif strength > 0 and schedule < max_steps:
                assert int(schedule * strength) == 1  # the shortest schedule that runs one step


def test_image_cost_counts_the_steps_run():
    p = {"width": 512, "height": 512, "steps": 20, "batch_size": 2, "n_iter": 3}
    assert image_cost("txt2img", ImageParams(**p), 150) == 512 * 512 * 20 * 2 * 3
    assert image_cost("img2img", ImageParams(**p, denoising_strength=0.5), 150) == 512 * 512 * 10 * 2 * 3
    assert image_cost("img2img", ImageParams(**p, denoising_strength=1e-30), 150) == 512 * 512 * 1 * 2 * 3
    assert image_cost("img2img", ImageParams(**p, denoising_strength=0.0), 150) == 0
    assert image_cost("txt2img", ImageParams(**{**p, "width": 1024, "height": 1024, "steps": 150, "batch_size": 1,
                                                "n_iter": 1}), 150) == IMAGE_LIMITS["max_pixel_steps"]
