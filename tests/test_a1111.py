"""The AUTOMATIC1111 API end to end: router process → ZeroMQ → diffusers workers on the embedded tiny model
(random weights, CPU), plus a SmolLM2 text worker for the "text is not blocked by images" check.

Sizes are small (64×64, a few steps) except where a test needs a job that lasts (256×256, many steps)."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from typing import Any

import pytest
import requests

from conftest import SMOLLM2

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

TOKEN, ALICE, BOB = "test-token", "alice-token", "bob-token"
TINY = {"name": "tiny-sd", "backend": "diffusers", "slots": 1}
TINY_B = {"name": "tiny-sd-b", "backend": "diffusers", "slots": 1}
SMALL = {"prompt": "a lighthouse at dusk", "width": 64, "height": 64, "steps": 4}
LONG = {"prompt": "a long job", "width": 256, "height": 256, "steps": 150}

INFO_KEYS = {"prompt", "all_prompts", "negative_prompt", "all_negative_prompts", "seed", "all_seeds", "subseed",
             "all_subseeds", "subseed_strength", "width", "height", "sampler_name", "cfg_scale", "steps",
             "batch_size", "restore_faces", "face_restoration_model", "sd_model_name", "sd_model_hash",
             "sd_vae_name", "sd_vae_hash", "seed_resize_from_w", "seed_resize_from_h", "denoising_strength",
             "extra_generation_params", "index_of_first_image", "infotexts", "styles", "job_timestamp",
             "clip_skip", "is_using_inpainting_conditioning", "notes", "interrupted"}


@pytest.fixture(scope="module")
def sd(start_router, start_worker):
    """Router with three tokens; image workers img-1 and img-2 (tiny-sd), img-3 (tiny-sd-b); a text worker.

    tiny-sd-b has a worker of its own: one worker loading two diffusers models at once fails (see the report
    on backends/diffusers.py), so each image worker here loads one."""
    router = start_router(token=f"{TOKEN},{ALICE},{BOB}")
    router.token = TOKEN
    start_worker(router, "img-1", [TINY], wait=False)
    start_worker(router, "img-2", [TINY], wait=False)
    start_worker(router, "img-3", [TINY_B], wait=False)
    start_worker(router, "text-1", [SMOLLM2], wait=False)
    names = {"img-1", "img-2", "img-3", "text-1"}
    health = router.wait_for(lambda h: names <= {w["id"] for w in h["workers"]}
                             and {"tiny-sd", "tiny-sd-b"} <= {m["name"] for w in h["workers"] for m in w["models"]},
                             timeout=180)
    assert not health["failures"], health["failures"]
    return router


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def png(b64: str) -> Any:
    assert not b64.startswith("data:")
    img = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    assert img.format == "PNG"
    img.load()
    return img


def mean_abs_diff(a: Any, b: Any) -> float:
    pa, pb = a.tobytes(), b.tobytes()
    return sum(abs(x - y) for x, y in zip(pa, pb, strict=True)) / len(pa)


def generate(router, path: str, body: dict[str, Any], token: str = TOKEN, timeout: float = 120) -> dict[str, Any]:
    r = router.post(f"/sdapi/v1/{path}", body, headers=auth(token), timeout=timeout)
    assert r.status_code == 200, r.text
    out = r.json()
    assert isinstance(out["info"], str)
    out["info_dict"] = json.loads(out["info"])
    return out


def progress(router, token: str = TOKEN) -> dict[str, Any]:
    r = router.get("/sdapi/v1/progress", headers=auth(token))
    assert r.status_code == 200, r.text
    return r.json()


class Background:
    """An HTTP request in a thread."""

    def __init__(self, fn, *args: Any, **kw: Any):
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.elapsed = 0.0

        def run() -> None:
            try:
                self.result = fn(*args, **kw)
            except BaseException as exc:  # noqa: BLE001 - reported by join()
                self.error = exc
            self.elapsed = time.monotonic() - self.started

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 120) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "request did not finish"
        if self.error:
            raise self.error
        return self.result


def wait_progress(router, token: str = TOKEN, min_step: int = 2, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        p = progress(router, token)
        if p["state"]["sampling_step"] >= min_step:
            return p
        time.sleep(0.02)
    raise AssertionError(f"no progress seen: {p}")


def workers(router) -> dict[str, dict[str, Any]]:
    return {w["id"]: w for w in router.health()["workers"]}


# ---- txt2img / img2img ------------------------------------------------------------------------------
def test_txt2img_shape(sd):
    out = generate(sd, "txt2img", SMALL)
    assert set(out) == {"images", "parameters", "info", "info_dict"}
    assert len(out["images"]) == 1
    assert png(out["images"][0]).size == (64, 64)
    params = out["parameters"]
    assert params["prompt"] == SMALL["prompt"] and params["steps"] == 4 and params["width"] == 64
    assert params["cfg_scale"] == 7.5 and params["batch_size"] == 1  # defaults echoed
    info = out["info_dict"]
    assert params["seed"] == info["seed"] != -1  # the seed drawn for the default -1, as the reference shows
    assert INFO_KEYS <= set(info)
    assert info["sd_model_name"] in ("tiny-sd", "tiny-sd-b") and info["sd_model_hash"]
    assert info["sampler_name"] == "Euler a" and info["cfg_scale"] == 7.5 and info["steps"] == 4
    assert 0 <= info["seed"] < 2**32 and info["all_seeds"] == [info["seed"]]
    assert info["interrupted"] is False and info["denoising_strength"] is None
    assert f"Seed: {info['seed']}" in info["infotexts"][0]
    assert len(info["job_timestamp"]) == 14


def test_txt2img_seed_example_body(sd):
    """The seed's curl example, unchanged: 768×512, 25 steps (about 10 s on a 2-core CPU)."""
    out = generate(sd, "txt2img", {"prompt": "a futuristic city at sunset", "width": 768, "height": 512,
                                   "steps": 25})
    assert png(out["images"][0]).size == (768, 512)
    assert out["info_dict"]["steps"] == 25


def test_img2img_with_returned_image(sd):
    first = generate(sd, "txt2img", {**SMALL, "seed": 7})["images"][0]
    raw = generate(sd, "img2img", {**SMALL, "init_images": [first], "seed": 8})
    uri = generate(sd, "img2img", {**SMALL, "init_images": ["data:image/png;base64," + first], "seed": 8})
    assert png(raw["images"][0]).size == (64, 64)
    assert raw["images"] == uri["images"]  # the prefix is stripped, nothing else changes
    assert raw["info_dict"]["denoising_strength"] == 0.75
    assert raw["parameters"]["init_images"] is None and raw["parameters"]["mask"] is None
    kept = generate(sd, "img2img", {**SMALL, "init_images": [first], "include_init_images": True,
                                    "denoising_strength": 0.5, "width": 128, "height": 128})
    assert kept["parameters"]["init_images"] == [first]
    assert png(kept["images"][0]).size == (128, 128)
    assert kept["info_dict"]["denoising_strength"] == 0.5


def test_inpaint_with_mask(sd):
    init = generate(sd, "txt2img", {**SMALL, "seed": 3})["images"][0]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    out = generate(sd, "img2img", {**SMALL, "init_images": [init], "mask": base64.b64encode(buf.getvalue()).decode(),
                                   "mask_blur": 2, "seed": 3})
    assert png(out["images"][0]).size == (64, 64)


def test_same_seed_same_bytes(sd):
    body = {**SMALL, "seed": 1234, "sampler_name": "DPM++ 2M", "scheduler": "karras"}
    a = generate(sd, "txt2img", body)
    b = generate(sd, "txt2img", body)
    assert a["images"] == b["images"]
    c = generate(sd, "txt2img", {**body, "seed": 1235})
    assert c["images"] != a["images"]
    assert a["info_dict"]["extra_generation_params"] == {"Schedule type": "Karras"}


def test_seed_minus_one_is_resolved(sd):
    out = generate(sd, "txt2img", {**SMALL, "seed": -1, "subseed": -1})
    info = out["info_dict"]
    assert info["seed"] != -1 and 0 <= info["seed"] < 2**32
    assert info["subseed"] != -1 and info["all_subseeds"] == [info["subseed"]]
    # the echo of the request carries what was resolved: the seeds drawn, the sampler used
    assert out["parameters"]["seed"] == info["seed"] and out["parameters"]["subseed"] == info["subseed"]
    assert out["parameters"]["sampler_name"] == info["sampler_name"] == "Euler a"


def test_batch_and_iterations(sd):
    out = generate(sd, "txt2img", {**SMALL, "seed": 100, "batch_size": 2, "n_iter": 2})
    info = out["info_dict"]
    assert len(out["images"]) == 4
    assert info["all_seeds"] == [100, 101, 102, 103]
    assert len(info["all_prompts"]) == 4 and len(info["infotexts"]) == 4
    for i, b64 in enumerate(out["images"]):
        assert f"Seed: {100 + i}," in png(b64).info["parameters"]
    assert len(set(out["images"])) == 4
    # image i of a batch is (up to float rounding in batched maths) the single request with seed + i
    single = png(generate(sd, "txt2img", {**SMALL, "seed": 102})["images"][0]).convert("RGB")
    third = png(out["images"][2]).convert("RGB")
    other = png(out["images"][3]).convert("RGB")
    assert mean_abs_diff(single, third) < 2 < mean_abs_diff(single, other)


def test_send_images_false(sd):
    out = generate(sd, "txt2img", {**SMALL, "seed": 5, "send_images": False, "batch_size": 2})
    assert out["images"] == []
    assert out["info_dict"]["all_seeds"] == [5, 6]


def test_ignored_features_are_noted(sd):
    out = generate(sd, "txt2img", {**SMALL, "styles": ["cinematic"], "enable_hr": True, "restore_faces": True,
                                   "some_future_field": {"x": 1}, "override_settings": {"sd_vae": "x"}})
    notes = " ".join(out["info_dict"]["notes"])
    for word in ("styles", "enable_hr", "restore_faces", "sd_vae"):
        assert word in notes
    assert out["info_dict"]["styles"] == ["cinematic"]
    assert png(out["images"][0]).size == (64, 64)


def test_model_selection(sd):
    models = sd.get("/sdapi/v1/sd-models").json()
    by_name = {m["model_name"]: m for m in models}
    assert {"tiny-sd", "tiny-sd-b"} <= set(by_name)
    assert len({m["title"] for m in models}) == len(models)  # titles stay unique
    for value in ("tiny-sd-b", by_name["tiny-sd-b"]["title"]):
        out = generate(sd, "txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": value}})
        assert out["info_dict"]["sd_model_name"] == "tiny-sd-b"
    out = generate(sd, "txt2img", {**SMALL, "model": "tiny-sd-b"})
    assert out["info_dict"]["sd_model_name"] == "tiny-sd-b"
    r = sd.post("/sdapi/v1/txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": "nope [123]"}})
    assert r.status_code == 404 and r.json()["error"]["param"] == "override_settings.sd_model_checkpoint"
    assert r.json()["error"]["code"] == "model_not_found"  # as for text models
    r = sd.post("/sdapi/v1/img2img", {**SMALL, "model": "no-such-checkpoint", "init_images": [_png_1px()]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found" and r.json()["detail"]
    r = sd.post("/sdapi/v1/txt2img", {**SMALL, "model": "smollm2-135m-instruct"})
    assert r.status_code == 400, r.text  # a text model cannot draw: the client's mistake, not a server error
    assert "txt2img" in r.json()["error"]["message"]


def test_parameters_carry_the_resolved_seed_and_sampler(sd):
    r = sd.post("/sdapi/v1/txt2img", {**SMALL, "sampler_name": "euler", "seed": -1})
    assert r.status_code == 200, r.text
    assert r.headers["X-Request-Id"].startswith("j-")  # as on the text routes
    out, info = r.json(), json.loads(r.json()["info"])
    assert out["parameters"]["seed"] == info["seed"] != -1
    assert out["parameters"]["sampler_name"] == info["sampler_name"] == "Euler"  # the name the backend used


def test_options_carry_what_a1111_clients_read(sd):
    body = options(sd, TOKEN)
    for key in ("send_seed", "send_size", "samples_format", "sd_model_checkpoint", "CLIP_stop_at_last_layers"):
        assert key in body, key
    assert body["send_seed"] is True and body["samples_format"] == "png" and body["sd_model_checkpoint"]


def _png_1px() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (1, 1), (200, 30, 30)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


PNG_1PX = _png_1px()


@pytest.mark.parametrize("path, body, param", [
    ("txt2img", {"width": 513}, "width"),
    ("txt2img", {"height": 1032}, "height"),
    ("txt2img", {"width": 32}, "width"),
    ("txt2img", {"width": "wide"}, "width"),
    ("txt2img", {"steps": 0}, "steps"),
    ("txt2img", {"steps": 151}, "steps"),
    ("txt2img", {"sampler_name": "Euler z"}, "sampler_name"),
    ("txt2img", {"sampler_index": "nope"}, "sampler_index"),
    ("txt2img", {"scheduler": "nope"}, "scheduler"),
    ("txt2img", {"batch_size": 9}, "batch_size"),
    ("txt2img", {"batch_size": 0}, "batch_size"),
    ("txt2img", {"n_iter": 0}, "n_iter"),
    ("txt2img", {"n_iter": 101}, "n_iter"),
    ("txt2img", {"cfg_scale": 31}, "cfg_scale"),
    ("txt2img", {"denoising_strength": 1.5}, "denoising_strength"),
    ("txt2img", {"prompt": ["a", "b"]}, "prompt"),
    ("txt2img", {"seed": "random"}, "seed"),
    ("txt2img", {"send_images": "yes"}, "send_images"),
    ("txt2img", {"override_settings": "sd15"}, "override_settings"),
    ("img2img", {}, "init_images"),
    ("img2img", {"init_images": []}, "init_images"),
    ("img2img", {"init_images": ["not base64!!"]}, "init_images[0]"),
    ("img2img", {"init_images": [base64.b64encode(b"hello, not an image").decode()]}, "init_images[0]"),
    ("img2img", {"init_images": [PNG_1PX, "data:image/png;base64,AAAA"]}, "init_images[1]"),
    ("img2img", {"init_images": [PNG_1PX], "mask": "%%%"}, "mask"),
    ("img2img", {"init_images": [PNG_1PX], "denoising_strength": -0.1}, "denoising_strength"),
])
def test_invalid_input_is_400_naming_the_field(sd, path, body, param):
    r = sd.post(f"/sdapi/v1/{path}", {**SMALL, **body})
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["error"]["code"] == "invalid_request"
    assert err["error"]["param"] == param
    assert err["detail"].startswith(param) and param in err["error"]["message"]


def test_unknown_sampler_lists_the_valid_ones(sd):
    r = sd.post("/sdapi/v1/txt2img", {**SMALL, "sampler_name": "Euler z"})
    assert "Euler a" in r.json()["detail"] and "DPM++ 2M" in r.json()["detail"]


def test_valid_1px_png_is_accepted_and_resized(sd):
    out = generate(sd, "img2img", {**SMALL, "init_images": [PNG_1PX]})
    assert png(out["images"][0]).size == (64, 64)


def test_bad_json_and_auth(sd):
    r = requests.post(sd.url + "/sdapi/v1/txt2img", data="{nope", headers=auth(TOKEN), timeout=10)
    assert r.status_code == 400 and "detail" in r.json()
    r = requests.get(sd.url + "/sdapi/v1/options", auth=("user", TOKEN), timeout=10)  # HTTP Basic
    assert r.status_code == 200
    r = requests.get(sd.url + "/sdapi/v1/options", auth=("user", "wrong"), timeout=10)
    assert r.status_code == 401 and r.json()["detail"]


# ---- listings and probes ---------------------------------------------------------------------------
def test_listings(sd):
    models = sd.get("/sdapi/v1/sd-models").json()
    for m in models:
        assert set(m) == {"title", "model_name", "hash", "sha256", "filename", "config"}
        assert m["title"].endswith(f"[{m['hash']}]")
    assert "smollm2-135m-instruct" not in {m["model_name"] for m in models}
    samplers = sd.get("/sdapi/v1/samplers").json()
    assert {"name": "Euler a"}.items() <= samplers[[s["name"] for s in samplers].index("Euler a")].items()
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers)
    schedulers = sd.get("/sdapi/v1/schedulers").json()
    assert {"automatic", "karras"} <= {s["name"] for s in schedulers}
    assert all({"name", "label", "aliases", "default_rho", "need_inner_model"} <= set(s) for s in schedulers)


@pytest.mark.parametrize("path, kind", [
    ("scripts", dict), ("upscalers", list), ("sd-vae", list), ("embeddings", dict), ("memory", dict),
    ("cmd-flags", dict), ("loras", list), ("prompt-styles", list), ("script-info", list),
    ("hypernetworks", list), ("face-restorers", list), ("realesrgan-models", list),
    ("latent-upscale-modes", list), ("sd-modules", list),
])
def test_startup_probes_answer_json(sd, path, kind):
    r = sd.get(f"/sdapi/v1/{path}")
    assert r.status_code == 200, r.text
    assert isinstance(r.json(), kind)
    if path == "scripts":
        assert r.json() == {"txt2img": [], "img2img": []}


def test_skip_interrupt_when_idle_and_png_info(sd):
    assert sd.post("/sdapi/v1/skip").json() == {}
    assert sd.post("/sdapi/v1/interrupt").json() == {}
    idle = progress(sd)
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["current_image"] is None
    image = generate(sd, "txt2img", {**SMALL, "seed": 11})["images"][0]
    info = sd.post("/sdapi/v1/png-info", {"image": image}).json()
    assert "Seed: 11," in info["info"]
    assert sd.post("/sdapi/v1/interrogate", {"image": image}).status_code == 501


# ---- options -------------------------------------------------------------------------------------
def options(router, token: str) -> dict[str, Any]:
    r = router.get("/sdapi/v1/options", headers=auth(token))
    assert r.status_code == 200, r.text
    return r.json()


def test_options_are_per_token(sd):
    titles = {m["model_name"]: m["title"] for m in sd.get("/sdapi/v1/sd-models").json()}
    assert options(sd, ALICE)["sd_model_checkpoint"] == titles["tiny-sd"]
    before = options(sd, BOB)
    assert before["samples_format"] == "png" and before["sd_checkpoint_hash"]
    r = sd.post("/sdapi/v1/options", {"sd_model_checkpoint": titles["tiny-sd-b"], "some_ui_setting": "kept"},
                headers=auth(ALICE))
    assert r.status_code == 200 and r.json() is None
    try:
        mine = options(sd, ALICE)
        assert mine["sd_model_checkpoint"] == titles["tiny-sd-b"] and mine["some_ui_setting"] == "kept"
        assert options(sd, BOB) == before  # token B does not see token A's change
        alice = generate(sd, "txt2img", SMALL, token=ALICE)["info_dict"]
        bob = generate(sd, "txt2img", SMALL, token=BOB)["info_dict"]
        assert alice["sd_model_name"] == "tiny-sd-b"
        assert bob["sd_model_name"] == "tiny-sd"
        # a request's own choice still wins over the stored default
        out = generate(sd, "txt2img", {**SMALL, "override_settings": {"sd_model_checkpoint": "tiny-sd"}}, token=ALICE)
        assert out["info_dict"]["sd_model_name"] == "tiny-sd"
    finally:
        sd.post("/sdapi/v1/options", {"sd_model_checkpoint": "tiny-sd"}, headers=auth(ALICE))
    r = sd.post("/sdapi/v1/options", {"sd_model_checkpoint": "no-such-model"}, headers=auth(ALICE))
    assert r.status_code == 400 and r.json()["error"]["param"] == "sd_model_checkpoint"
    r = sd.post("/sdapi/v1/options", {"samples_format": "jpg"}, headers=auth(ALICE))
    assert r.status_code == 400 and r.json()["error"]["param"] == "samples_format"
    assert options(sd, ALICE)["sd_model_checkpoint"] == titles["tiny-sd"]


def test_clip_skip_reaches_the_backend(sd):
    out = generate(sd, "txt2img", {**SMALL, "override_settings": {"CLIP_stop_at_last_layers": 2}})
    assert out["info_dict"]["clip_skip"] == 2
    assert len(out["images"]) == 1
    # Honoured where diffusers can apply it; otherwise the job still runs and info says it was ignored.
    assert ("Clip skip: 2" in out["info_dict"]["infotexts"][0]
            or any("clip_skip" in note for note in out["info_dict"]["notes"]))


# ---- progress, interrupt, cancel -------------------------------------------------------------------
def test_progress_moves_during_a_job(sd):
    job = Background(generate, sd, "txt2img", {**LONG, "steps": 40, "n_iter": 2, "seed": 9})
    seen: list[dict[str, Any]] = []
    others: list[dict[str, Any]] = []
    while job.thread.is_alive():
        seen.append(progress(sd))
        if len(others) < 3:
            others.append(progress(sd, BOB))
        time.sleep(0.02)
    out = job.join()
    assert len(out["images"]) == 2
    fractions = [p["progress"] for p in seen]
    steps = [(p["state"]["job_no"], p["state"]["sampling_step"]) for p in seen if p["state"]["sampling_steps"]]
    assert any(0 < f < 1 for f in fractions), fractions
    assert len(set(steps)) >= 3 and steps == sorted(steps), steps  # moves forward, never back
    running = [p for p in seen if p["state"]["sampling_steps"]]
    assert all(p["state"]["job"] == "txt2img" and p["state"]["job_count"] == 2 for p in running)
    assert all(p["state"]["sampling_steps"] == 40 for p in running)
    moving = [p["progress"] for p in running]
    assert moving == sorted(moving), moving
    assert any(p["state"]["job_no"] == 1 for p in running)  # the second pass is reported too
    assert all(o["state"]["job_count"] == 0 for o in others)  # another token's view stays idle
    assert progress(sd)["state"]["job_count"] == 0  # idle again


def test_interrupt_returns_what_is_done(sd):
    job = Background(generate, sd, "txt2img", {**LONG, "n_iter": 3, "seed": 21})
    wait_progress(sd, min_step=3)
    assert sd.post("/sdapi/v1/interrupt", headers=auth(BOB)).json() == {}  # someone else's interrupt
    time.sleep(0.3)
    assert job.thread.is_alive()
    t0 = time.monotonic()
    assert sd.post("/sdapi/v1/interrupt").json() == {}
    out = job.join(30)
    assert time.monotonic() - t0 < 10
    info = out["info_dict"]
    assert info["interrupted"] is True
    assert len(out["images"]) == 1 and info["all_seeds"] == [21]
    assert png(out["images"][0]).size == (256, 256)
    assert any("interrupted" in n for n in info["notes"])
    assert progress(sd)["state"]["job_count"] == 0


def test_client_disconnect_cancels_the_job(sd):
    # far longer than the deadline below, and within the default max_pixel_steps (256² × 150 × 15)
    body = json.dumps({**LONG, "n_iter": 15, "seed": 31}).encode()
    sock = socket.create_connection(("127.0.0.1", sd.port), timeout=10)
    sock.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    wait_progress(sd, min_step=2)
    assert sum(w["jobs_in_flight"] for w in workers(sd).values()) == 1
    sock.close()
    deadline = time.monotonic() + 10  # a step takes well under a second; generous for a loaded host
    while time.monotonic() < deadline:
        if all(w["jobs_in_flight"] == 0 for w in workers(sd).values()):
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"job still running after the client left: {workers(sd)}")
    assert progress(sd)["state"]["job_count"] == 0


def test_two_image_workers_run_in_parallel(sd):
    before = {name: w["jobs_done"] for name, w in workers(sd).items()}
    body = {**LONG, "steps": 60, "override_settings": {"sd_model_checkpoint": "tiny-sd"}}
    jobs = [Background(generate, sd, "txt2img", {**body, "seed": s}) for s in (1, 2)]
    both_busy = False
    while any(j.thread.is_alive() for j in jobs):
        w = workers(sd)
        both_busy = both_busy or (w["img-1"]["jobs_in_flight"] == 1 and w["img-2"]["jobs_in_flight"] == 1)
        time.sleep(0.02)
    for j in jobs:
        assert len(j.join()["images"]) == 1
    after = {name: w["jobs_done"] for name, w in workers(sd).items()}
    assert after["img-1"] - before["img-1"] == 1 and after["img-2"] - before["img-2"] == 1
    assert both_busy


def test_text_is_not_blocked_by_an_image_job(sd):
    job = Background(generate, sd, "txt2img", {**LONG, "n_iter": 15, "seed": 41})  # runs until interrupted
    wait_progress(sd, min_step=2)
    r = sd.post("/completion", {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"]
    assert job.thread.is_alive()  # answered while the image job still runs on its own worker
    assert progress(sd)["state"]["job_count"] == 15
    sd.post("/sdapi/v1/interrupt")
    out = job.join(60)
    assert out["info_dict"]["interrupted"] is True and len(out["images"]) < 15


# ---- in-process: options scopes and advertised limits (no worker processes) -------------------------
async def _app_with_fake_worker(scope: str, aiohttp_client, meta: dict[str, Any] | None = None):
    from velesio.config import RouterConfig
    from velesio.mesh import codec
    from velesio.mesh.protocol import VERSION, Command
    from velesio.router import app as router_app
    from velesio.router.keys import SCHEDULER

    cfg = RouterConfig(tokens={"ta": "a", "tb": "b"}, options_scope=scope)
    app = router_app.init_app(cfg)
    app.cleanup_ctx.clear()  # no ZeroMQ socket, no timers: the fake worker never expires
    scheduler = app[SCHEDULER]
    scheduler.send = lambda identity, frame: None

    def model(name: str, title: str) -> dict[str, Any]:
        return {"name": name, "backend": "fake", "kind": "image", "operations": ["txt2img", "img2img"], "slots": 1,
                "meta": {"title": title, "hash": "abcdef0123", "filename": f"/m/{name}.safetensors",
                         **(meta or {})}}

    greeting = {"version": VERSION, "worker": "fake",
                "capabilities": {"models": [model("m1", "same.safetensors [abcdef0123]"),
                                            model("m2", "same.safetensors [abcdef0123]")]}}
    scheduler.process_worker(b"fake-1", codec.encode(Command.READY, greeting))
    return await aiohttp_client(app)


@pytest.mark.parametrize("scope", ["token", "global"])
async def test_options_scope(scope, aiohttp_client):
    client = await _app_with_fake_worker(scope, aiohttp_client)
    a, b = auth("ta"), auth("tb")
    models = await (await client.get("/sdapi/v1/sd-models", headers=a)).json()
    assert sorted(m["title"] for m in models) == ["m1 [abcdef0123]", "m2 [abcdef0123]"]  # same title: made unique
    r = await client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "m2 [abcdef0123]"}, headers=a)
    assert r.status == 200 and await r.json() is None
    seen_a = (await (await client.get("/sdapi/v1/options", headers=a)).json())["sd_model_checkpoint"]
    seen_b = (await (await client.get("/sdapi/v1/options", headers=b)).json())["sd_model_checkpoint"]
    assert seen_a == "m2 [abcdef0123]"
    assert seen_b == ("m2 [abcdef0123]" if scope == "global" else "m1 [abcdef0123]")


async def test_limits_come_from_the_model(aiohttp_client):
    client = await _app_with_fake_worker("token", aiohttp_client,
                                         {"max_width": 128, "max_height": 96, "max_pixels": 128 * 64, "max_steps": 10,
                                          "max_batch": 2, "max_iter": 3, "samplers": ["Euler a", "DDIM"]})
    for body, param in (({"width": 136}, "width"), ({"height": 104}, "height"), ({"width": 128, "height": 96}, "width"),
                        ({"steps": 11}, "steps"), ({"batch_size": 3}, "batch_size"), ({"n_iter": 4}, "n_iter"),
                        ({"sampler_name": "Heun"}, "sampler_name")):
        r = await client.post("/sdapi/v1/txt2img", json={"width": 64, "height": 64, "steps": 5, **body},
                              headers=auth("ta"))
        assert r.status == 400, (body, await r.text())
        assert (await r.json())["error"]["param"] == param
