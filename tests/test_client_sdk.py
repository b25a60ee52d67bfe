"""The project's own Python SDK (velesio.client), sync and async, against real router and worker processes."""

from __future__ import annotations

import importlib.util
import io
import json
import struct
import threading
import time

import pytest

from velesio.client import (
    AsyncClient,
    Client,
    Completion,
    ImageResult,
    InvalidRequest,
    ModelNotFound,
    QueueFull,
    RateLimited,
    ServiceUnavailable,
    Unauthorized,
    VelesioError,
    encode_image,
    make_error,
)

FRANCE = "What is the capital of France? Answer in one sentence."
QA = "Q: What is the capital of France?\nA:"
CHAT = [{"role": "user", "content": FRANCE}]
GREEDY = {"temperature": 0, "max_tokens": 24}
SEEDED = {"temperature": 0.8, "seed": 7, "max_tokens": 16}


@pytest.fixture(scope="module")
def client(mesh) -> Client:
    return Client(mesh.url, mesh.token, timeout=120, max_retries=0)


def test_complete_and_chat(client):
    r = client.complete(QA, **GREEDY)
    assert isinstance(r, Completion) and r["object"] == "text_completion"
    assert "Paris" in r.text and r["choices"][0]["text"] == r.text  # still the seed's dict
    assert r.usage["completion_tokens"] > 0 and r.finish_reason in ("stop", "length")
    c = client.chat(CHAT, **GREEDY)
    assert c["object"] == "chat.completion" and "Paris" in c.text


def test_streams_concatenate_to_the_whole_text(client):
    whole = client.complete("Once upon a time", **SEEDED).text
    pieces = list(client.stream_complete("Once upon a time", **SEEDED))
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
    assert "".join(pieces) == whole
    chat_whole = client.chat(CHAT, **SEEDED).text
    assert "".join(client.stream_chat(CHAT, **SEEDED)) == chat_whole


def test_stream_can_be_abandoned(client):
    stream = client.stream_complete("Count to one hundred:", max_tokens=200, temperature=0)
    assert next(stream)
    stream.close()  # closes the connection; the router cancels the job
    assert client.complete("Hi", max_tokens=2).text is not None


def test_status_routes(client):
    health = client.health()
    assert health["status"] == "healthy" and health["services"]["llm_worker"] == "ready"
    models = client.models()
    assert "smollm2-135m-instruct" in {m["name"] for m in models["text_models"]}
    queue = client.queue_status()
    assert queue["active_workers"] >= 1 and "queue_depth" in queue


def test_default_model_is_sent(mesh):
    named = Client(mesh.url, mesh.token, model="smollm2-135m-instruct", max_retries=0)
    assert named.complete("Hi", max_tokens=2)["model"] == "smollm2-135m-instruct"
    with pytest.raises(ModelNotFound):
        Client(mesh.url, mesh.token, model="no-such-model", max_retries=0).chat(CHAT)


def test_typed_errors(mesh, client):
    with pytest.raises(Unauthorized) as exc:
        Client(mesh.url, "wrong-token", max_retries=0).complete("Hi")
    assert exc.value.status == 401 and exc.value.code == "unauthorized" and exc.value.message
    with pytest.raises(ModelNotFound) as exc:
        client.complete("Hi", model="no-such-model")
    assert exc.value.status == 404 and exc.value.code == "model_not_found"
    with pytest.raises(InvalidRequest) as exc:
        client.chat(CHAT, temperature=5)
    assert exc.value.status == 400 and exc.value.code == "invalid_request" and "temperature" in exc.value.message
    with pytest.raises(InvalidRequest):  # raised before the first piece of a stream too
        list(client.stream_chat(CHAT, temperature=-1))
    with pytest.raises(VelesioError) as exc:
        Client("http://127.0.0.1:1", "t", timeout=5).health()
    assert exc.value.status == 0 and exc.value.code == "connection_error"


def test_error_shapes_of_every_dialect():
    assert isinstance(make_error(503, {"error": {"code": "queue_full", "message": "full"}}, 2.0), QueueFull)
    llama = make_error(0, {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}})
    assert isinstance(llama, ServiceUnavailable) and llama.status == 503
    a1111 = make_error(422, {"error": "HTTPException", "detail": "Sampler not found"})
    assert a1111.message == "Sampler not found" and a1111.status == 422
    assert isinstance(make_error(0, {"error": {"code": "rate_limited", "message": "m"}}), RateLimited)


async def test_async_client(mesh):
    async with AsyncClient(mesh.url, mesh.token, max_retries=0) as aclient:
        r = await aclient.complete(QA, **GREEDY)
        assert "Paris" in r.text
        c = await aclient.chat(CHAT, **GREEDY)
        assert "Paris" in c.text
        whole = (await aclient.chat(CHAT, **SEEDED)).text
        pieces = [p async for p in aclient.stream_chat(CHAT, **SEEDED)]
        assert len(pieces) > 1 and "".join(pieces) == whole
        streamed = "".join([p async for p in aclient.stream_complete("Once upon a time", **SEEDED)])
        assert streamed == (await aclient.complete("Once upon a time", **SEEDED)).text
        assert (await aclient.health())["status"] == "healthy"
        assert (await aclient.models())["text_models"]
        assert "queue_depth" in await aclient.queue_status()
        with pytest.raises(ModelNotFound):
            await aclient.complete("Hi", model="no-such-model")
        with pytest.raises(InvalidRequest):
            async for _ in aclient.stream_complete("Hi", temperature=9):
                pass
    async with AsyncClient(mesh.url, "wrong-token") as bad:
        with pytest.raises(Unauthorized):
            await bad.chat(CHAT)


@pytest.fixture(scope="module")
def narrow(start_router):
    """A router allowing one request at a time per token, with no worker: a text request holds the one slot
    for worker_wait_s (2 s) and then fails with 503 no_worker."""
    return start_router({"rate_limit": {"requests_per_minute": 1000, "concurrent": 1}, "worker_wait_s": 2.0})


def _hold_slot(router, errors: list) -> threading.Thread:
    def hold() -> None:
        try:
            Client(router.url, router.token, max_retries=0).complete("Hi")
        except VelesioError as exc:
            errors.append(exc)

    thread = threading.Thread(target=hold)
    thread.start()
    time.sleep(0.5)
    return thread


def test_retry_honours_retry_after(narrow):
    errors: list = []
    thread = _hold_slot(narrow, errors)
    with pytest.raises(RateLimited) as exc:
        Client(narrow.url, narrow.token, max_retries=0).models()
    assert exc.value.status == 429 and exc.value.retry_after == 1
    started = time.monotonic()
    models = Client(narrow.url, narrow.token, max_retries=3).models()  # 429, waits 1 s, retries
    elapsed = time.monotonic() - started
    thread.join()
    assert models == {"text_models": [], "image_models": [], "object": "list", "data": []} and elapsed >= 1.0
    assert len(errors) == 1 and isinstance(errors[0], ServiceUnavailable) and errors[0].code == "no_worker"
    assert errors[0].retry_after and errors[0].retry_after > 0


async def test_async_retry_and_capped_wait(narrow):
    errors: list = []
    thread = _hold_slot(narrow, errors)
    async with AsyncClient(narrow.url, narrow.token, max_retries=1, max_retry_wait=0.2) as capped:
        started = time.monotonic()
        with pytest.raises(RateLimited):  # one retry after 0.2 s instead of Retry-After's 1 s
            await capped.models()
        assert 0.2 <= time.monotonic() - started < 0.95  # not the 1 s of Retry-After
    async with AsyncClient(narrow.url, narrow.token, max_retries=3) as aclient:
        started = time.monotonic()
        models = await aclient.models()
        elapsed = time.monotonic() - started
    thread.join()
    assert models["text_models"] == [] and elapsed >= 1.0 and len(errors) == 1


# ---- images: only where an image model is live ---------------------------------------------------------------

def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def test_image_result_parsing():
    png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + struct.pack(">II", 8, 4) + b"\x08\x02\x00\x00\x00"
    b64 = encode_image(png)
    r = ImageResult({"images": [b64, "data:image/png;base64," + b64], "parameters": {"width": 8},
                     "info": json.dumps({"seed": 5, "all_seeds": [5]})})
    assert r.images == [png, png] and _png_size(r.images[0]) == (8, 4)
    assert r.info == {"seed": 5, "all_seeds": [5]} and r.parameters == {"width": 8}
    assert ImageResult({"images": [], "info": "not json"}).info == "not json"


def image_routes_available() -> str | None:
    """Why images cannot be tested here, or None when they can."""
    if importlib.util.find_spec("velesio.router.dialects.a1111") is None:
        return "the router has no AUTOMATIC1111 routes (velesio.router.dialects.a1111 is not installed)"
    if importlib.util.find_spec("diffusers") is None:
        return "the diffusers backend is not installed"
    return None


@pytest.fixture(scope="module")
def image_client(client, start_router, start_worker) -> Client:
    """The session router when it has an image model; else a router of its own with the embedded tiny-sd."""
    if client.models()["image_models"]:
        return client
    reason = image_routes_available()
    if reason:
        pytest.skip(f"no image model is live on the test router, and {reason}")
    router = start_router()
    start_worker(router, "image-1", [{"name": "tiny-sd", "backend": "diffusers", "slots": 1,
                                      "options": {"embedded": True}}], wait=False)
    router.wait_workers({"image-1"}, timeout=240)
    image_client = Client(router.url, router.token, timeout=240, max_retries=0)
    if not image_client.models()["image_models"]:
        pytest.skip("the image worker registered but /models lists no image model")
    return image_client


def test_txt2img_and_img2img(image_client):
    r = image_client.txt2img("a lighthouse at dusk", width=64, height=64, steps=2, seed=1234)
    assert isinstance(r, ImageResult) and len(r.images) == 1
    assert _png_size(r.images[0]) == (64, 64)
    assert isinstance(r.info, dict) and r.info["seed"] == 1234 and r.parameters["width"] == 64
    again = image_client.img2img(r.images, "a lighthouse at night", width=64, height=64, steps=2,
                                 denoising_strength=0.5)
    assert _png_size(again.images[0]) == (64, 64)
    try:
        pil = r.pil_images()
    except ImportError:
        return
    assert pil[0].size == (64, 64) and io.BytesIO(again.images[0]).read(4) == b"\x89PNG"


async def test_async_txt2img_and_img2img_from_pil(image_client):
    async with AsyncClient(image_client.base_url, image_client.token, max_retries=0) as aclient:
        r = await aclient.txt2img("a red square", width=96, height=64, steps=2, seed=7, batch_size=2)
        assert len(r.images) == 2 and all(_png_size(png) == (96, 64) for png in r.images)
        assert r.info["all_seeds"][:2] == [7, 8] or r.info["seed"] == 7
        try:
            init = r.pil_images()[0]  # a PIL image is accepted as init image
        except ImportError:
            init = r.images[0]
        again = await aclient.img2img(init, "a blue square", width=96, height=64, steps=2)
        assert _png_size(again.images[0]) == (96, 64)
