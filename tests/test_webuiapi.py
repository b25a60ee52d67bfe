"""The real ``webuiapi`` client (mix1009/sdwebuiapi), unmodified, against a router and a tiny-sd image worker.

webuiapi speaks HTTP Basic only; the router takes the API token as the Basic password."""

from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
webuiapi = pytest.importorskip("webuiapi")

TOKEN = "webui-token"


@pytest.fixture(scope="module")
def router(start_router, start_worker):
    router = start_router(token=TOKEN)
    start_worker(router, "webui-img-1", [{"name": "tiny-sd", "backend": "diffusers"}], wait=False)
    start_worker(router, "webui-img-2", [{"name": "tiny-sd-b", "backend": "diffusers"}], wait=False)
    router.wait_workers({"webui-img-1", "webui-img-2"}, timeout=180)
    return router


@pytest.fixture
def api(router):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=router.port)
    api.set_auth("user", TOKEN)
    return api


def test_wrong_password_is_refused(router):
    api = webuiapi.WebUIApi(host="127.0.0.1", port=router.port)
    api.set_auth("user", "not-the-token")
    with pytest.raises(RuntimeError) as exc:
        api.txt2img(prompt="x", width=64, height=64, steps=2)
    assert exc.value.args[0] == 401


def test_txt2img(api):
    result = api.txt2img(prompt="a cat in a hat", negative_prompt="blurry", seed=42, width=64, height=64,
                         steps=4, batch_size=2, cfg_scale=6)
    assert len(result.images) == 2
    assert result.image.size == (64, 64)
    assert isinstance(result.info, dict)  # webuiapi json.loads the info string
    assert result.info["all_seeds"] == [42, 43]
    assert result.info["sampler_name"] == "Euler a" and result.info["cfg_scale"] == 6
    assert result.parameters["prompt"] == "a cat in a hat" and result.parameters["steps"] == 4
    again = api.txt2img(prompt="a cat in a hat", negative_prompt="blurry", seed=42, width=64, height=64,
                        steps=4, batch_size=2, cfg_scale=6)
    assert again.image.tobytes() == result.image.tobytes()


def test_txt2img_sampler_and_scheduler(api):
    result = api.txt2img(prompt="x", width=64, height=64, steps=3, sampler_name="DPM++ 2M", scheduler="Karras")
    assert result.info["sampler_name"] == "DPM++ 2M"
    assert result.info["extra_generation_params"].get("Schedule type") == "Karras"
    with pytest.raises(RuntimeError) as exc:
        api.txt2img(prompt="x", width=64, height=64, steps=3, sampler_name="No Such Sampler")
    assert exc.value.args[0] == 400 and "sampler_name" in exc.value.args[1]


def test_img2img(api):
    source = api.txt2img(prompt="x", seed=1, width=64, height=64, steps=3).image
    result = api.img2img(images=[source], prompt="a painting", denoising_strength=0.6, width=64, height=64,
                         steps=5, seed=2)
    assert result.image.size == (64, 64)
    assert result.info["denoising_strength"] == 0.6
    assert result.parameters["init_images"] is None  # not echoed unless include_init_images
    from PIL import Image

    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    inpainted = api.img2img(images=[source], mask_image=mask, prompt="x", width=64, height=64, steps=4, seed=3)
    assert inpainted.image.size == (64, 64)


def test_models_samplers_and_current_model(api):
    models = api.get_sd_models()
    names = {m["model_name"] for m in models}
    assert {"tiny-sd", "tiny-sd-b"} <= names
    titles = api.util_get_model_names()
    assert len(titles) == len(models)
    assert "Euler a" in api.util_get_sampler_names()
    assert "karras" in api.util_get_scheduler_names()
    current = api.util_get_current_model()
    assert current in titles
    for probe in (api.get_upscalers, api.get_sd_vae, api.get_loras, api.get_hypernetworks, api.get_face_restorers,
                  api.get_realesrgan_models, api.get_prompt_styles, api.get_embeddings, api.get_memory,
                  api.get_cmd_flags, api.get_scripts, api.get_latent_upscale_modes):
        probe()  # each answers valid JSON


def test_options_and_model_switch(api):
    options = api.get_options()
    assert options["samples_format"] == "png"
    title_b = next(m["title"] for m in api.get_sd_models() if m["model_name"] == "tiny-sd-b")
    original = api.util_get_current_model()
    try:
        assert api.set_options({"sd_model_checkpoint": title_b}) is None
        assert api.util_get_current_model() == title_b
        assert api.txt2img(prompt="x", width=64, height=64, steps=2).info["sd_model_name"] == "tiny-sd-b"
        api.util_set_model("tiny-sd-b")  # webuiapi's fuzzy title match then set_options
        assert api.util_get_current_model() == title_b
        result = api.txt2img(prompt="x", width=64, height=64, steps=2,
                             override_settings={"sd_model_checkpoint": "tiny-sd"})
        assert result.info["sd_model_name"] == "tiny-sd"
    finally:
        api.set_options({"sd_model_checkpoint": original})
    assert api.util_get_current_model() == original


def test_progress_and_interrupt(api):
    assert api.get_progress()["state"]["job_count"] == 0
    api.util_wait_for_ready(check_interval=0.1)  # returns at once when idle
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault(
        "result", api.txt2img(prompt="long", width=256, height=256, steps=150, n_iter=5, seed=5)), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    seen = None
    while time.monotonic() < deadline:
        p = api.get_progress()
        if p["state"]["sampling_step"] >= 2:
            seen = p
            break
        time.sleep(0.02)
    assert seen is not None and 0 < seen["progress"] < 1 and seen["state"]["job_count"] == 5
    assert api.interrupt() == {}
    thread.join(60)
    assert not thread.is_alive()
    result = out["result"]
    assert result.info["interrupted"] is True
    assert 1 <= len(result.images) < 5
    assert api.skip() == {}
    api.util_wait_for_ready(check_interval=0.1)
