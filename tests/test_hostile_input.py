"""No 5xx, no hang, nothing lost: generated hostile input against every route of a real router and real
workers (SmolLM2 with embeddings, and tiny-sd when diffusers is installed), then the router's and workers'
logs hold no traceback and both still serve.

The generator is ``hypothesis``: each route's valid body with one to three fields replaced by hostile values
(wrong types, integers beyond 64 bits, raw literals such as ``1e400`` and a 1 followed by 400 zeros, NaN,
nested objects of the wrong shape ...). Fields that size the work a valid request does (``max_tokens``,
``n_predict``, ``width``, ``steps`` ...) only ever get values that are refused, so that a request that
happens to be valid stays cheap. The run is derandomized (the same examples every run) with a bounded count;
``VELESIO_HOSTILE_EXAMPLES=2000 VELESIO_HOSTILE_RANDOM=1 pytest tests/test_hostile_input.py`` runs a
longer, random search.

The named cases of the issue each have a test of their own below the generated ones."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import socket
import time
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import SMOLLM2

EXAMPLES = int(os.environ.get("VELESIO_HOSTILE_EXAMPLES", "100"))
SETTINGS = settings(max_examples=EXAMPLES, derandomize=not os.environ.get("VELESIO_HOSTILE_RANDOM"),
                    database=None, deadline=None, print_blob=True, suppress_health_check=list(HealthCheck))

TEXT_MODEL = {**SMOLLM2, "options": {"n_ctx": 512, "n_threads": 1, "embeddings": True}}
TINY = {"name": "tiny-sd", "backend": "diffusers", "slots": 1}
TEXT_WORKER, IMAGE_WORKER = "hostile-text", "hostile-img"


def _have_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
        import PIL  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def hostile(start_router, start_worker):
    """A router with short header and body timeouts, a SmolLM2 worker serving embeddings, and a tiny-sd
    worker where diffusers is installed."""
    router = start_router({"header_timeout_s": 2, "body_timeout_s": 2})
    router.workers = {TEXT_WORKER: start_worker(router, TEXT_WORKER, [TEXT_MODEL], wait=False)}
    if _have_diffusers():
        router.workers[IMAGE_WORKER] = start_worker(router, IMAGE_WORKER, [TINY], wait=False)
    health = router.wait_for(lambda h: set(router.workers) <= {w["id"] for w in h["workers"]}, timeout=240)
    assert not health["failures"], health["failures"]
    return router


def _png(side: int = 64) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (side, side), (10, 120, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


# ---- the generator ---------------------------------------------------------------------------------------
RAW = "\x00raw:"  # a string that becomes a raw JSON literal once the body is encoded
_RAW_TOKEN = re.compile(r'"\\u0000raw:([^"]*)"')
DELETE = "\x00delete"  # the field is left out


def raw(literal: str) -> str:
    return RAW + literal


def encode(body: dict[str, Any]) -> bytes:
    text = json.dumps({k: v for k, v in body.items() if v != DELETE}, allow_nan=True)
    return _RAW_TOKEN.sub(lambda m: m.group(1), text).encode("utf-8", "surrogatepass")


HUGE = st.one_of(st.integers(min_value=2**63, max_value=10**420), st.integers(min_value=-10**420, max_value=-2**63 - 1))
RAW_NUMBERS = st.sampled_from(["1" + "0" * 400, "-1" + "0" * 400, "1e400", "-1e400", "1e-400", "NaN", "Infinity",
                               "-Infinity", "1.0e309", "18446744073709551616", "9223372036854775808",
                               "-9223372036854775809", "0.0000000000000000000000000000001"]).map(raw)
ODD_STRINGS = st.sampled_from(["", " ", "\u0000", "💥" * 50, "data: [DONE]\n\n", "-1", "NaN", "null", "{}", "x" * 5000,
                               "<|im_start|>", "\ud800", "🚀\u202e"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-2**40, max_value=2**40), HUGE, st.floats(),
                    st.text(max_size=30), RAW_NUMBERS, ODD_STRINGS)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                      max_leaves=10)
# Values a field may well accept: small numbers (subnormal floats included), short strings, booleans.
PLAUSIBLE = st.one_of(st.floats(min_value=0.0, max_value=2.0), st.integers(min_value=-1, max_value=100),
                      st.booleans(), st.text(max_size=8), st.sampled_from([0.0, 5e-324, 1e-30, 1.0, "Euler", "text"]))
# For a field that sizes the work: only values that are refused (never a valid large number, never absent).
NOT_A_SIZE = st.one_of(HUGE, RAW_NUMBERS, st.integers(min_value=10**6, max_value=2**62),
                       st.integers(min_value=-2**62, max_value=-2), st.floats().filter(lambda x: not x.is_integer()),
                       st.text(max_size=10), st.booleans(), st.lists(SCALARS, max_size=2),
                       st.dictionaries(st.text(max_size=5), SCALARS, max_size=2))
MESSAGES = st.one_of(VALUES, st.lists(st.fixed_dictionaries({
    "role": st.one_of(st.sampled_from(["user", "system", "assistant", "developer", "tool", "bot"]), VALUES),
    "content": st.one_of(VALUES, st.lists(st.fixed_dictionaries({
        "type": st.sampled_from(["text", "image_url"]) | VALUES, "text": VALUES}), max_size=3)),
}), max_size=3))
NESTED: dict[str, st.SearchStrategy[Any]] = {
    "messages": MESSAGES,
    "stop": st.one_of(VALUES, st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=5)), max_size=5)),
    "response_format": st.one_of(VALUES, st.fixed_dictionaries({
        "type": st.one_of(st.sampled_from(["text", "json_object", "json_schema"]), VALUES),
        "schema": VALUES, "json_schema": st.one_of(VALUES, st.fixed_dictionaries({"schema": VALUES}))})),
    "logit_bias": st.one_of(VALUES, st.dictionaries(st.text(max_size=5), VALUES, max_size=3),
                            st.lists(st.lists(VALUES, max_size=3), max_size=3)),
    "init_images": st.one_of(VALUES, st.lists(VALUES, max_size=3)),
    "prompt": st.one_of(VALUES, st.lists(st.one_of(st.integers(), HUGE, st.text(max_size=5)), max_size=5)),
    "input": st.one_of(VALUES, st.lists(st.one_of(st.integers(), HUGE, st.text(max_size=5),
                                                  st.lists(st.integers(), max_size=3)), max_size=4)),
    "tokens": st.one_of(VALUES, st.lists(st.one_of(st.integers(), HUGE), max_size=5)),
    "override_settings": st.one_of(VALUES, st.dictionaries(
        st.sampled_from(["sd_model_checkpoint", "CLIP_stop_at_last_layers", "samples_format", "x"]), VALUES,
        max_size=3)),
}


def hostile_bodies(base: dict[str, Any], fields: list[str], sizing: frozenset[str]) -> st.SearchStrategy[dict]:
    """``base`` with one to three of ``fields`` replaced by hostile values (or left out, where that cannot
    make the request expensive)."""
    def value_for(name: str) -> st.SearchStrategy[Any]:
        if name in sizing:
            return NOT_A_SIZE
        return st.one_of(NESTED.get(name, VALUES), PLAUSIBLE, st.just(DELETE))

    return (st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True)
            .flatmap(lambda names: st.fixed_dictionaries({n: value_for(n) for n in names}))
            .map(lambda changes: {**base, **changes}))


TEXT_FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "n_predict", "temperature", "top_p",
               "top_k", "min_p", "typical_p", "repeat_penalty", "repeat_last_n", "presence_penalty",
               "frequency_penalty", "mirostat", "mirostat_tau", "mirostat_eta", "stop", "stream", "seed", "model",
               "grammar", "json_schema", "response_format", "n", "best_of", "logprobs", "top_logprobs",
               "stream_options", "logit_bias", "n_keep", "ignore_eos", "n_probs", "response_fields", "tools",
               "tool_choice", "echo", "cache_prompt", "id_slot", "samplers", "dry_multiplier", "unknown_field"]
TEXT_SIZING = frozenset({"max_tokens", "max_completion_tokens", "n_predict", "n", "best_of", "n_probs",
                         "top_logprobs", "logprobs"})
UTILITY_FIELDS = ["content", "tokens", "add_special", "with_pieces", "messages", "add_generation_prompt", "model",
                  "input", "encoding_format", "embd_normalize", "stream", "prompt", "unknown_field"]
IMAGE_FIELDS = ["prompt", "negative_prompt", "width", "height", "steps", "cfg_scale", "sampler_name",
                "sampler_index", "scheduler", "seed", "subseed", "subseed_strength", "batch_size", "n_iter",
                "denoising_strength", "init_images", "mask", "mask_blur", "eta", "clip_skip", "override_settings",
                "styles", "restore_faces", "tiling", "enable_hr", "send_images", "resize_mode", "model",
                "script_name", "alwayson_scripts", "seed_resize_from_w", "seed_resize_from_h",
                "inpainting_mask_invert", "include_init_images"]
IMAGE_SIZING = frozenset({"width", "height", "steps", "batch_size", "n_iter"})

CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
TEXT_ROUTES = [
    ("/completion", {"prompt": "Hi", "max_tokens": 1}),
    ("/completion", {"prompt": "Hi", "n_predict": 1}),
    ("/completions", {"prompt": "Hi", "n_predict": 1}),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 1}),
    ("/chat/completions", CHAT),
    ("/v1/chat/completions", {**CHAT, "model": "smollm2-135m-instruct"}),
]
UTILITY_ROUTES = [
    ("/tokenize", {"content": "Hello world"}),
    ("/detokenize", {"tokens": [1, 2, 3]}),
    ("/apply-template", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("/embeddings", {"content": "Hi"}),
    ("/v1/embeddings", {"input": "Hi"}),
    ("/props", {}),
    ("/template", {}),
]


def send(router, path: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    r = requests.post(router.url + path, data=data, timeout=120,
                      headers={**router.headers, "Content-Type": "application/json", **(headers or {})})
    return r.status_code, r.content


def send_generated(router, path: str, body: dict[str, Any]) -> None:
    data = encode(body)
    status, answer = send(router, path, data)
    event(f"{path} -> {status}")  # --hypothesis-show-statistics shows how many were answered how
    assert_answer(path, data, status, answer)


def assert_answer(path: str, data: bytes, status: int, body: bytes) -> None:
    """No 5xx; an error in the error shape; a stream without a server error in it."""
    where = f"POST {path} {data[:300]!r} -> {status} {body[:300]!r}"
    assert status < 500, where
    if status >= 400:
        err = json.loads(body)["error"]
        assert err["message"], where
    elif body.startswith(b"data: "):
        for line in body.split(b"\n"):
            if line.startswith(b"data: {"):
                event = json.loads(line[len(b"data: "):])
                code = event.get("error", {}).get("code") if isinstance(event.get("error"), dict) else None
                assert code is None or (code if isinstance(code, int) else 400) < 500, where


def route_bodies(routes, fields, sizing) -> st.SearchStrategy[tuple[str, dict]]:
    return st.one_of(*(st.tuples(st.just(path), hostile_bodies(base, fields, sizing)) for path, base in routes))


# ---- generated hostile requests ------------------------------------------------------------------------
@SETTINGS
@given(case=route_bodies(TEXT_ROUTES, TEXT_FIELDS, TEXT_SIZING))
def test_generated_hostile_text_requests(hostile, case):
    send_generated(hostile, *case)


@SETTINGS
@given(case=route_bodies(UTILITY_ROUTES, UTILITY_FIELDS, frozenset()))
def test_generated_hostile_utility_requests(hostile, case):
    send_generated(hostile, *case)


@pytest.fixture(scope="module")
def image_routes(hostile):
    if IMAGE_WORKER not in hostile.workers:
        pytest.skip("diffusers is not installed")
    base = {"prompt": "x", "width": 64, "height": 64, "steps": 1}
    return [("/sdapi/v1/txt2img", base),
            ("/sdapi/v1/img2img", {**base, "init_images": [_png()], "denoising_strength": 0.5}),
            ("/sdapi/v1/options", {"CLIP_stop_at_last_layers": 1})]


@SETTINGS
@given(data=st.data())
def test_generated_hostile_image_requests(hostile, image_routes, data):
    send_generated(hostile, *data.draw(route_bodies(image_routes, IMAGE_FIELDS, IMAGE_SIZING)))


# ---- the named cases --------------------------------------------------------------------------------------
HUGE_LITERAL = "1" + "0" * 400


@pytest.mark.parametrize("path, base, field", [
    ("/completion", {"prompt": "x", "max_tokens": 1}, "temperature"),
    ("/completion", {"prompt": "x", "n_predict": 1}, "top_p"),
    ("/completion", {"prompt": "x", "n_predict": 1}, "min_p"),
    ("/completion", {"prompt": "x", "n_predict": 1}, "repeat_penalty"),
    ("/v1/chat/completions", CHAT, "temperature"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 64, "height": 64, "steps": 1}, "cfg_scale"),
])
def test_huge_integer_literal_in_a_float_field_is_400(hostile, path, base, field):
    data = encode({**base, field: raw(HUGE_LITERAL)})
    status, body = send(hostile, path, data)
    assert status == 400, body
    assert field in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("path, body", [
    ("/completion", {"prompt": "", "max_tokens": 1}),
    ("/completion", {"prompt": [], "n_predict": 1}),
    ("/completion", {"prompt": [""], "n_predict": 1}),
    ("/completion", {"prompt": "", "n_predict": 1, "stream": True}),
    ("/completions", {"prompt": "", "n_predict": 1}),
    ("/v1/completions", {"prompt": "", "max_tokens": 1}),
    ("/v1/completions", {"prompt": [""], "max_tokens": 1, "stream": True}),
    ("/embeddings", {"content": ""}),
    ("/v1/embeddings", {"input": ""}),
    ("/v1/embeddings", {"input": []}),
    ("/v1/embeddings", {"input": ["a", ""]}),
])
def test_empty_prompt_is_a_clear_400(hostile, path, body):
    status, raw_body = send(hostile, path, encode(body))
    assert status == 400, raw_body
    err = json.loads(raw_body)["error"]
    assert "empty" in err["message"] and ("prompt" in err["message"] or "input" in err["message"]
                                          or "content" in err["message"])


@pytest.mark.parametrize("field, value", [
    ("top_k", 2**63), ("repeat_last_n", 2**64), ("seed", 2**64), ("n_keep", 2**70), ("mirostat", -2**63 - 1),
    ("json_schema", {"type": "string", "maxLength": 2**64}), ("prompt", [1, 2**64]),
])
def test_integers_beyond_64_bits_are_refused_at_the_edge(hostile, field, value):
    status, body = send(hostile, "/completion", encode({"prompt": "x", "n_predict": 1, field: value}))
    assert status == 400, body
    assert field in json.loads(body)["error"]["message"]
    time.sleep(0.2)
    assert "cannot be encoded" not in hostile.proc.log


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": {"text": "hi"}}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 42}]}, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "stop": [1, 2]}, "stop"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema", "json_schema": "x"}},
     "response_format"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object", "schema": 3}}, "response_format"),
    ("/v1/chat/completions", {**CHAT, "response_format": "json"}, "response_format"),
    ("/completion", {"prompt": "x", "n_predict": 1, "stop": [None]}, "stop"),
])
def test_wrong_types_in_nested_fields_are_400(hostile, path, body, param):
    status, raw_body = send(hostile, path, encode(body))
    assert status == 400, raw_body
    assert param in json.loads(raw_body)["error"]["message"]


DEEP = 20000  # nesting that overflowed llama.cpp's grammar parser (the backend died of SIGSEGV)


@pytest.mark.parametrize("path, body, param", [
    ("/completion", {"prompt": "x", "n_predict": 2, "grammar": "root ::= " + '("a" ' * DEEP + ")?" * DEEP},
     "grammar"),
    ("/v1/chat/completions", {**CHAT, "grammar": "root ::= " + '("a" ' * DEEP + ")?" * DEEP}, "grammar"),
    ("/completion", {"prompt": "x", "n_predict": 2, "json_schema": {"type": "string", "maxLength": DEEP}},
     "json_schema.maxLength"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_object", "schema": {
        "type": "object", "properties": {"a": {"type": "string", "pattern": f"^a{{0,{DEEP}}}$"}}}}},
     "response_format.schema.properties.a.pattern"),
])
def test_grammars_too_deep_for_llama_cpp_are_400(hostile, path, body, param):
    worker = next(w for w in hostile.health()["workers"] if w["id"] == TEXT_WORKER)
    before = worker["models"][0]["backend_process"]
    status, raw_body = send(hostile, path, encode(body))
    assert status == 400, raw_body
    assert param in json.loads(raw_body)["error"]["message"]
    worker = next(w for w in hostile.health()["workers"] if w["id"] == TEXT_WORKER)
    after = worker["models"][0]["backend_process"]
    assert after["pid"] == before["pid"] and after["crashes"] == before["crashes"]


def test_wrong_image_entries_are_400(hostile, image_routes):
    for entries in ([1], [None], [{"x": 1}], ["not base64!"], [[_png()]]):
        body = {"prompt": "x", "width": 64, "height": 64, "steps": 1, "init_images": entries}
        status, raw_body = send(hostile, "/sdapi/v1/img2img", encode(body))
        assert status == 400, raw_body
        assert "init_images" in json.loads(raw_body)["error"]["message"]


@pytest.mark.parametrize("strength", [1e-30, 5e-324, 1e-9])
def test_tiny_denoising_strength_runs_one_step(hostile, image_routes, strength):
    body = {"prompt": "x", "width": 64, "height": 64, "steps": 20, "init_images": [_png()],
            "denoising_strength": strength}
    status, raw_body = send(hostile, "/sdapi/v1/img2img", encode(body))
    assert status == 200, raw_body
    info = json.loads(json.loads(raw_body)["info"])
    assert len(json.loads(raw_body)["images"]) == 1 and info["denoising_strength"] == strength


# ---- what the HTTP layer sees ----------------------------------------------------------------------------
def raw_exchange(router, data: bytes, *, pause: float = 0.0, chunks: list[bytes] | None = None,
                 timeout: float = 30) -> tuple[bytes, float]:
    """Send ``data`` (then each of ``chunks``, ``pause`` apart) on a fresh connection; everything the
    router answers until it closes, and how long that took."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", router.port), timeout=timeout) as sock:
        sock.sendall(data)
        for chunk in chunks or ():
            time.sleep(pause)
            try:
                sock.sendall(chunk)
            except OSError:
                break
        out = b""
        while True:
            try:
                piece = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not piece:
                break
            out += piece
    return out, time.monotonic() - started


def head(router, method: str = "POST", path: str = "/completion", extra: str = "", version: str = "HTTP/1.1") -> bytes:
    return (f"{method} {path} {version}\r\nHost: 127.0.0.1:{router.port}\r\nAuthorization: Bearer {router.token}\r\n"
            f"Connection: close\r\n{extra}").encode()


def status_and_error(answer: bytes) -> tuple[int, dict[str, Any]]:
    head_part, _, body = answer.partition(b"\r\n\r\n")
    status = int(head_part.split(b" ", 2)[1])
    assert b"application/json" in head_part.lower(), answer[:400]
    return status, json.loads(body)["error"]


@pytest.mark.parametrize("name, request_bytes", [
    ("unknown method", lambda r: head(r, method="BREW", path="/") + b"\r\n"),
    ("HTTP/9.9", lambda r: head(r, method="GET", path="/health", version="HTTP/9.9") + b"\r\n"),
    ("header over 64 KB", lambda r: head(r, method="GET", path="/models", extra="X-Big: " + "a" * 70000 + "\r\n")
     + b"\r\n"),
    ("duplicate Content-Length", lambda r: head(r, extra="Content-Length: 2\r\nContent-Length: 2\r\n") + b"\r\n{}"),
    ("Content-Length with Transfer-Encoding",
     lambda r: head(r, extra="Content-Length: 5\r\nTransfer-Encoding: chunked\r\n") + b"\r\n0\r\n\r\n"),
    ("raw UTF-8 path", lambda r: head(r, method="GET", path="/é") + b"\r\n"),
])
def test_http_parser_errors_have_the_json_error_shape(hostile, name, request_bytes):
    answer, _ = raw_exchange(hostile, request_bytes(hostile))
    status, err = status_and_error(answer)
    assert status == 400 and err["code"] == "invalid_request" and err["message"], (name, answer[:400])


@pytest.mark.parametrize("encoding, status", [("gzip", 400), ("deflate", 400), ("br", 415), ("zstd", 415)])
def test_a_body_that_does_not_match_its_content_encoding(hostile, encoding, status):
    body = b'{"prompt": "x", "n_predict": 1}'
    extra = f"Content-Type: application/json\r\nContent-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n"
    answer, _ = raw_exchange(hostile, head(hostile, extra=extra) + b"\r\n" + body)
    got, err = status_and_error(answer)
    assert got == status and err["message"], answer[:400]


def test_a_gzip_body_is_still_read(hostile):
    import gzip

    status, body = send(hostile, "/tokenize", gzip.compress(b'{"content": "hello"}'), {"Content-Encoding": "gzip"})
    assert status == 200 and json.loads(body)["tokens"], body


def test_slow_headers_get_408_within_the_header_timeout(hostile):
    start = head(hostile, method="GET", path="/health")
    answer, took = raw_exchange(hostile, start, pause=0.5, chunks=[b"X-Slow: 1\r\n"] * 20)
    status, err = status_and_error(answer)
    assert status == 408 and err["code"] == "request_timeout"
    assert took < 8  # 2 s header timeout, not the 10 s the client would take


def test_a_silent_connection_is_closed(hostile):
    answer, took = raw_exchange(hostile, b"")
    assert answer.startswith(b"HTTP/1.1 408") and took < 8


def test_a_body_announced_but_never_sent_gets_408(hostile):
    extra = "Content-Type: application/json\r\nContent-Length: 40000000\r\n"
    answer, took = raw_exchange(hostile, head(hostile, extra=extra) + b"\r\n" + b'{"prompt": "x", "n_pre')
    status, err = status_and_error(answer)
    assert status == 408 and err["code"] == "request_timeout"
    assert took < 20  # the 2 s body timeout, then aiohttp's 10 s lingering close at most


def test_many_slow_clients_do_not_pin_the_router(hostile):
    """A few hundred connections that never finish their headers are all closed; the router serves meanwhile."""
    socks = []
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", hostile.port), timeout=10)
            s.sendall(b"GET /health HTTP/1.1\r\nX-Slow: ")
            socks.append(s)
        assert requests.get(hostile.url + "/health", timeout=10).status_code == 200
        time.sleep(4)
        closed = 0
        for s in socks:
            s.settimeout(5)
            try:
                data = s.recv(4096)
                while data and b"\r\n\r\n" not in data:
                    data += s.recv(4096)
                closed += data.startswith(b"HTTP/1.1 408") or not data
            except OSError:
                closed += 1
        assert closed == len(socks)
    finally:
        for s in socks:
            s.close()


# ---- errors that must name how to fix them ----------------------------------------------------------------
def test_llamacpp_errors_carry_details(hostile):
    status, body = send(hostile, "/completion", encode({"prompt": "x", "n_predict": -2}))
    err = json.loads(body)["error"]
    assert status == 400 and err["code"] == 400 and "details" in err


def test_embeddings_without_an_embedding_model_say_how_to_enable_them(start_router, start_worker):
    router = start_router()
    plain = {**SMOLLM2, "options": {"n_ctx": 256, "n_threads": 1, "embeddings": False}}
    start_worker(router, "no-embed-1", [plain])
    for path, body in (("/embeddings", {"content": "hello"}), ("/v1/embeddings", {"input": "hello"}),
                       ("/v1/embeddings", {"input": "hello", "model": SMOLLM2["name"]})):
        r = router.post(path, body)
        assert r.status_code == 400, r.text
        assert "options.embeddings: true" in r.json()["error"]["message"]


# ---- afterwards -------------------------------------------------------------------------------------------
def test_no_traceback_nothing_lost_and_still_serving(hostile):
    """Last in this module: every job ended, no traceback in any log, both processes still serve."""
    deadline = time.monotonic() + 60
    while hostile.get("/queue/status").json()["pending_jobs"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert hostile.get("/queue/status").json()["pending_jobs"] == 0
    r = hostile.post("/completion", {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["text"]
    r = hostile.post("/v1/embeddings", {"input": "hello"})
    assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) > 16
    if IMAGE_WORKER in hostile.workers:
        r = hostile.post("/sdapi/v1/txt2img", {"prompt": "x", "width": 64, "height": 64, "steps": 1})
        assert r.status_code == 200 and r.json()["images"]
    time.sleep(0.3)  # INFO lines reach the logs within 0.1 s
    assert "Traceback" not in hostile.proc.log, hostile.proc.log[-5000:]
    assert " ERROR " not in hostile.proc.log, [line for line in hostile.proc.log.splitlines() if " ERROR " in line]
    for name, proc in hostile.workers.items():
        assert proc.alive(), name
        assert "Traceback" not in proc.log, (name, proc.log[-5000:])
    assert all(w["status"] in ("idle", "busy") for w in hostile.health()["workers"])
