"""In-process tests of the diffusers image backend on the embedded tiny model (random weights, CPU)."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import threading

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
PIL_Image = pytest.importorskip("PIL.Image")

from velesio.backends import (  # noqa: E402
    Cancelled,
    ImageParams,
    ImageResult,
    InvalidRequest,
    JobContext,
    ModelConfig,
    samplers,
    tiny_sd,
)
from velesio.backends.diffusers import DiffusersBackend, detect_sdxl_file, detect_sdxl_folder, model_hash  # noqa: E402
from velesio.mesh.jobs import Job  # noqa: E402

BASE = {
    "prompt": "a lighthouse at dusk",
    "negative_prompt": "",
    "width": 64,
    "height": 64,
    "steps": 4,
    "cfg_scale": 7.0,
    "sampler_name": "Euler a",
    "scheduler": "automatic",
    "seed": 1234,
    "subseed": 99,
    "batch_size": 1,
    "n_iter": 1,
    "send_images": True,
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tiny-sd-cache")


@pytest.fixture(scope="module")
def backend(cache_dir):
    cfg = ModelConfig(name="tiny-sd", backend="diffusers", path=None, slots=1,
                      options={"embedded": True, "cache_dir": str(cache_dir)})
    b = DiffusersBackend(cfg)
    meta = b.load()
    b.test_meta = meta
    yield b
    b.close()


def run(backend, op="txt2img", emit=None, ctx=None, **params) -> ImageResult:
    job = Job(op=op, model="tiny-sd", params=ImageParams(**{**BASE, **params}))
    ctx = ctx or JobContext(job, emit or (lambda chunk: None))
    result = backend.run(job, ctx)
    assert isinstance(result, ImageResult)
    return result


def png(data: bytes):
    img = PIL_Image.open(io.BytesIO(data))
    img.load()
    return img


# ---------------------------------------------------------------- discovery and build


def test_available_and_embedded():
    assert DiffusersBackend.unavailable_reason() is None
    models = DiffusersBackend.embedded_models()
    assert [(m.name, m.backend, m.path, m.slots, m.options) for m in models] == [
        ("tiny-sd", "diffusers", None, 1, {"embedded": True})]
    assert DiffusersBackend.name == "diffusers" and DiffusersBackend.kind == "image"
    assert DiffusersBackend.operations == ("txt2img", "img2img")


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VELESIO_CACHE", str(tmp_path))
    assert tiny_sd.default_dir() == tmp_path / "tiny-sd" / f"v{tiny_sd.BUILD_VERSION}"
    assert tiny_sd.default_dir(tmp_path / "x") == tmp_path / "x" / f"v{tiny_sd.BUILD_VERSION}"


def test_load_meta(backend, cache_dir):
    meta = backend.test_meta
    for key, value in {"max_width": 1024, "max_height": 1024, "max_pixels": 1048576, "max_steps": 150,
                       "max_batch": 8, "type": "checkpoint", "embedded": True}.items():
        assert meta[key] == value, key
    import torch

    if torch.cuda.is_available():
        assert meta["device"].startswith("cuda") and meta["dtype"] == "float16"
    else:
        assert meta["device"] == "cpu" and meta["dtype"] == "float32" and meta["threads"] == 1
    # the A1111-shaped lists, which the router lists and resolves names against
    assert meta["samplers"] == samplers.SAMPLERS and meta["schedulers"] == samplers.SCHEDULERS
    assert [s["name"] for s in meta["samplers"]] == samplers.sampler_names()
    assert len(meta["hash"]) == 10 and meta["title"] == f"tiny-sd [{meta['hash']}]"
    folder = tiny_sd.default_dir(cache_dir)
    assert meta["filename"] == str(folder)
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["scheduler"][1] == "EulerAncestralDiscreteScheduler"
    assert not detect_sdxl_folder(folder)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 12 * 1024 * 1024


def test_tokenizer_really_tokenizes(backend):
    tok = backend._pipe.tokenizer
    ids = tok("a lighthouse at dusk").input_ids
    vocab = tiny_sd.vocabulary()
    assert ids[0] == vocab[tiny_sd.BOS] and ids[-1] == vocab[tiny_sd.EOS]
    assert len(ids) > 10  # byte-level pieces, not an empty or all-unknown encoding
    assert len(set(ids)) > 8
    assert tok.model_max_length == 77


def test_build_is_deterministic_and_race_free(backend, tmp_path):
    # two workers building into the same cache at once: both end with the same, complete model
    results, errors = [], []

    def build():
        try:
            results.append(tiny_sd.ensure(tmp_path))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert results[0] == results[1] == tiny_sd.default_dir(tmp_path)
    assert tiny_sd.is_built(results[0])
    assert [p.name for p in tmp_path.iterdir()] == [f"v{tiny_sd.BUILD_VERSION}"]  # no leftover temp folder
    assert model_hash(results[0]) == backend.test_meta["hash"]


# ---------------------------------------------------------------- txt2img


def test_txt2img_png_size_and_info(backend):
    r = run(backend, width=64, height=72)
    assert len(r.images) == 1 and r.seeds == [1234] and r.subseeds == [99]
    img = png(r.images[0])
    assert img.format == "PNG" and img.size == (64, 72)
    # What the image was made with, for the router's A1111 dialect to write the infotext and the PNG chunk
    assert "parameters" not in img.info
    assert (r.width, r.height, r.sampler_name, r.scheduler, r.steps, r.cfg_scale, r.clip_skip) == (
        64, 72, "Euler a", "automatic", 4, 7.0, 1)
    assert (r.model, r.model_hash, r.interrupted, r.notes) == ("tiny-sd", backend.test_meta["hash"], False, [])
    assert r.denoising_strength is None and r.total_s > 0


def test_same_seed_same_bytes(backend):
    a = run(backend, seed=7)
    b = run(backend, seed=7)
    c = run(backend, seed=8)
    assert a.images == b.images
    assert a.images != c.images


def test_prompt_matters(backend):
    assert run(backend, prompt="red").images != run(backend, prompt="a blue boat").images


def test_batch_seeds_and_iterations(backend):
    r = run(backend, seed=500, batch_size=2, n_iter=2, steps=2)
    assert r.seeds == [500, 501, 502, 503]
    assert r.subseeds == [99, 100, 101, 102]
    assert len(r.images) == 4 and len(set(r.images)) == 4
    # the second image of a batch uses seed + 1: a batch is reproducible
    again = run(backend, seed=500, batch_size=2, n_iter=2, steps=2)
    assert again.images == r.images


def test_send_images_false(backend):
    r = run(backend, send_images=False, steps=1)
    assert r.images == [] and r.seeds == [1234]


def test_progress_goes_1_to_steps(backend):
    chunks = []
    run(backend, emit=chunks.append, steps=5, batch_size=1, n_iter=2)
    assert [c["step"] for c in chunks] == [1, 2, 3, 4, 5, 1, 2, 3, 4, 5]
    assert all(c["steps"] == 5 and c["images"] == 2 for c in chunks)
    assert [c["image"] for c in chunks] == [0] * 5 + [1] * 5


def test_progress_second_order_sampler(backend):
    chunks = []
    run(backend, emit=chunks.append, steps=3, sampler_name="Heun")
    assert [c["step"] for c in chunks] == [1, 2, 3]


# ---------------------------------------------------------------- cancel


def _cancelling_ctx(at_step: int, keep: bool):
    job = Job(op="txt2img", model="tiny-sd", params=ImageParams())
    holder = {}

    def emit(chunk):
        holder.setdefault("chunks", []).append(chunk)
        if chunk["step"] == at_step:
            holder["ctx"].cancel(keep_partial=keep)

    ctx = JobContext(job, emit)
    holder["ctx"] = ctx
    return ctx, holder


def test_cancel_mid_run_raises(backend):
    ctx, holder = _cancelling_ctx(2, keep=False)
    with pytest.raises(Cancelled):
        run(backend, ctx=ctx, steps=6, n_iter=2)
    assert max(c["step"] for c in holder["chunks"]) == 2


def test_cancel_before_start_raises(backend):
    ctx = JobContext(Job(op="txt2img", model="tiny-sd", params=ImageParams()), lambda c: None)
    ctx.cancel()
    with pytest.raises(Cancelled):
        run(backend, ctx=ctx)


def test_interrupt_keeps_partial(backend):
    ctx, holder = _cancelling_ctx(2, keep=True)
    r = run(backend, ctx=ctx, steps=6, batch_size=2, n_iter=3)
    assert r.interrupted is True
    assert r.seeds == [1234, 1235] and len(r.images) == 2  # the batch in progress, no later ones
    assert png(r.images[0]).size == (64, 64)
    assert max(c["step"] for c in holder["chunks"]) == 2
    # the pipeline is usable again afterwards
    assert run(backend, steps=2).interrupted is False


# ---------------------------------------------------------------- img2img


def test_img2img_from_returned_image(backend):
    first = run(backend).images[0]
    r = run(backend, op="img2img", init_images=[first], denoising_strength=0.5, steps=4, seed=3)
    assert r.denoising_strength == 0.5 and len(r.images) == 1
    assert png(r.images[0]).size == (64, 64)
    assert r.images == run(backend, op="img2img", init_images=[first], denoising_strength=0.5,
                              steps=4, seed=3).images


def test_img2img_resizes_and_progress(backend):
    buf = io.BytesIO()
    PIL_Image.new("RGB", (40, 30), (200, 30, 30)).save(buf, format="JPEG")
    chunks = []
    r = run(backend, op="img2img", emit=chunks.append, init_images=[buf.getvalue()], width=96, height=64,
            denoising_strength=0.5, steps=6)
    assert png(r.images[0]).size == (96, 64)
    assert [c["step"] for c in chunks] == [1, 2, 3]  # 6 steps at strength 0.5 run 3


def test_img2img_with_mask(backend):
    init = run(backend, steps=2).images[0]
    mask = PIL_Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    r = run(backend, op="img2img", init_images=[init], mask=buf.getvalue(), denoising_strength=0.75, steps=4)
    assert png(r.images[0]).size == (64, 64)
    assert not any(n.startswith("mask ignored") for n in r.notes)


def test_bad_init_image(backend):
    with pytest.raises(InvalidRequest, match=r"init_images\[0\]: not a decodable image"):
        run(backend, op="img2img", init_images=[b"definitely not a png"])
    with pytest.raises(InvalidRequest, match="init_images"):
        run(backend, op="img2img", init_images=[])


# ---------------------------------------------------------------- samplers


def test_every_sampler_runs(backend):
    for name in samplers.sampler_names():
        r = run(backend, sampler_name=name, steps=2, seed=11)
        assert r.sampler_name == name and len(r.images) == 1, name
        assert png(r.images[0]).size == (64, 64), name


def test_schedule_types_run(backend):
    for schedule in ("karras", "exponential", "sgm_uniform", "Automatic"):
        r = run(backend, sampler_name="DPM++ 2M", scheduler=schedule, steps=2)
        assert len(r.images) == 1, schedule
    r = run(backend, sampler_name="DPM++ 2M", scheduler="Karras", steps=2)
    assert (r.sampler_name, r.scheduler) == ("DPM++ 2M", "karras")  # the canonical names, for the infotext


def test_sampler_aliases():
    assert samplers.resolve_sampler("k_euler_a") == "Euler a"
    assert samplers.resolve_sampler("euler_a") == "Euler a"
    assert samplers.resolve_sampler("EULER A") == "Euler a"
    assert samplers.resolve_sampler("k_dpmpp_2m") == "DPM++ 2M"
    assert samplers.resolve_sampler("dpm++ 2m karras") == "DPM++ 2M Karras"
    assert samplers.resolve_sampler("") == samplers.DEFAULT_SAMPLER
    assert samplers.resolve_sampler("nope") is None
    assert samplers.resolve_scheduler("Karras") == "karras"
    assert samplers.resolve_scheduler("SGMUniform") == "sgm_uniform"
    assert samplers.resolve_scheduler(None) == "automatic"
    assert samplers.resolve_scheduler("zigzag") is None
    for name in ("Euler a", "Euler", "DPM++ 2M", "DPM++ 2M Karras", "DPM++ SDE", "DDIM", "LMS", "Heun",
                 "UniPC"):
        assert samplers.resolve_sampler(name) == name
    assert samplers.resolve_sampler("Euler Ancestral") == samplers.resolve_sampler("k_euler_a_karras") == "Euler a"
    assert all(set(s) == {"name", "aliases", "options"} for s in samplers.SAMPLERS)
    # Every name resolve_sampler accepts is listed (a router resolves from the advertised list): the same
    # normalisation (case, "_" and "-" as spaces) of some entry's name or alias, never of two entries.
    listed: dict[str, str] = {}
    for entry in samplers.SAMPLERS:
        for key in (entry["name"], *entry["aliases"]):
            assert listed.setdefault(samplers._norm(key), entry["name"]) == entry["name"], key
    assert listed == samplers._SAMPLER_INDEX
    assert all(set(s) == {"name", "label", "aliases", "default_rho", "need_inner_model"}
               for s in samplers.SCHEDULERS)


def test_samplers_module_needs_no_torch():
    code = ("import sys, velesio.backends.samplers as s; assert s.resolve_sampler('k_lms') == 'LMS'; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sampler_alias_and_lcm_schedule(backend):
    # params may carry an alias: the result names the canonical sampler
    assert run(backend, sampler_name="k_dpmpp_2m", steps=1).sampler_name == "DPM++ 2M"
    # LCMScheduler raises mid-job beyond its distillation schedule (50 steps): refused first, by the backend
    with pytest.raises(InvalidRequest, match="steps: sampler LCM runs at most 50 steps, got 51"):
        run(backend, sampler_name="LCM", steps=51)


def test_unknown_sampler_and_limits(backend):
    with pytest.raises(InvalidRequest, match="Euler a"):
        run(backend, sampler_name="Warp Drive")
    with pytest.raises(InvalidRequest, match="scheduler"):
        run(backend, scheduler="zigzag")
    with pytest.raises(InvalidRequest, match="width: must be <= 1024 for model 'tiny-sd', got 2048"):
        run(backend, width=2048, height=64)
    with pytest.raises(InvalidRequest, match="steps"):
        run(backend, steps=0)
    with pytest.raises(InvalidRequest, match="batch_size"):
        run(backend, batch_size=9)
    # checked with the router's own function (mesh/limits.py): sizes are not rounded, they are refused
    with pytest.raises(InvalidRequest, match=r"width: must be a multiple of 8, got 100 \(try 96\)"):
        run(backend, width=100)
    with pytest.raises(InvalidRequest, match="max_pixel_steps"):
        run(backend, width=1024, height=1024, steps=150, batch_size=2)
    with pytest.raises(InvalidRequest, match="cfg_scale"):
        run(backend, cfg_scale=float("nan"))


# ---------------------------------------------------------------- checkpoint detection


def _fake_safetensors(path, keys):
    header = json.dumps({k: {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
                         for i, k in enumerate(keys)}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 4 * len(keys))
    return path


def test_sdxl_detection(tmp_path):
    xl = _fake_safetensors(tmp_path / "model.safetensors",
                           ["conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias"])
    sd = _fake_safetensors(tmp_path / "v1.safetensors", ["model.diffusion_model.input_blocks.0.0.weight"])
    assert detect_sdxl_file(xl) and not detect_sdxl_file(sd)
    (tmp_path / "juggernautXL_v9.ckpt").write_bytes(b"x")
    (tmp_path / "v1-5-pruned.ckpt").write_bytes(b"x")
    assert detect_sdxl_file(tmp_path / "juggernautXL_v9.ckpt")
    assert not detect_sdxl_file(tmp_path / "v1-5-pruned.ckpt")
    (tmp_path / "xl").mkdir()
    (tmp_path / "xl" / "model_index.json").write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    assert detect_sdxl_folder(tmp_path / "xl")


# ---------------------------------------------------------------- loading real checkpoints (wiring)


def test_load_from_folder_path(backend, cache_dir):
    folder = tiny_sd.default_dir(cache_dir)
    b = DiffusersBackend(ModelConfig(name="sd-folder", backend="diffusers", path=str(folder),
                                     options={"device": "auto", "dtype": "auto", "threads": 1, "max_width": 128,
                                              "max_steps": 10}))
    meta = b.load()
    try:
        assert meta["embedded"] is False and meta["pipeline"] == "StableDiffusionPipeline"
        assert meta["filename"] == str(folder) and meta["hash"] == backend.test_meta["hash"]
        assert (meta["max_width"], meta["max_steps"], meta["max_height"]) == (128, 10, 1024)
        r = b.run(Job(op="txt2img", model="sd-folder", params=ImageParams(**{**BASE, "steps": 2})), JobContext(
            Job(op="txt2img", model="sd-folder", params=ImageParams()), lambda c: None))
        assert isinstance(r, ImageResult)
        assert r.model == "sd-folder" and png(r.images[0]).size == (64, 64)
        with pytest.raises(InvalidRequest, match="width: must be <= 128 for model 'sd-folder'"):
            b.run(Job(op="txt2img", model="sd-folder", params=ImageParams(**{**BASE, "width": 256})),
                  JobContext(Job(op="txt2img", model="sd-folder", params=ImageParams()), lambda c: None))
    finally:
        b.close()


@pytest.mark.parametrize("sdxl", [False, True])
def test_load_single_file_picks_pipeline(monkeypatch, tmp_path, cache_dir, sdxl):
    import diffusers

    key = ("conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias" if sdxl
           else "model.diffusion_model.input_blocks.0.0.weight")
    ckpt = _fake_safetensors(tmp_path / "checkpoint.safetensors", [key])
    calls = []

    def fake_from_single_file(cls, path, **kwargs):
        calls.append((cls.__name__, path, kwargs))
        return tiny_sd.load(cache_dir)

    for cls in (diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline):
        monkeypatch.setattr(cls, "from_single_file", classmethod(fake_from_single_file))
    b = DiffusersBackend(ModelConfig(name="ckpt", backend="diffusers", path=str(ckpt),
                                     options={"device": "cpu", "config": "/models/sd15-config"}))
    meta = b.load()
    name, path, kwargs = calls[0]
    assert name == ("StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline")
    assert path == str(ckpt) and kwargs["config"] == "/models/sd15-config"
    assert str(kwargs["torch_dtype"]) == "torch.float32"
    assert meta["sdxl"] is sdxl and meta["filename"] == str(ckpt) and len(meta["hash"]) == 10
    assert meta["title"] == f"checkpoint.safetensors [{meta['hash']}]"
    b.close()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        DiffusersBackend(ModelConfig(name="m", backend="diffusers", path=str(tmp_path / "none"))).load()
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="safetensors"):
        DiffusersBackend(ModelConfig(name="m", backend="diffusers", path=str(tmp_path / "notes.txt"))).load()
    with pytest.raises(ValueError, match="dtype"):
        DiffusersBackend(ModelConfig(name="m", backend="diffusers", path=None,
                                     options={"dtype": "int3"})).load()


def test_img2img_low_strength_and_zero(backend):
    init = run(backend, steps=1).images[0]
    r = run(backend, op="img2img", init_images=[init], denoising_strength=0.1, steps=4)
    assert len(r.images) == 1 and any("used 10 steps" in n for n in r.notes)
    r = run(backend, op="img2img", init_images=[init], denoising_strength=0.0, steps=4, batch_size=2)
    assert r.seeds == [1234, 1235] and len(r.images) == 2
    assert png(r.images[0]).size == (64, 64)
