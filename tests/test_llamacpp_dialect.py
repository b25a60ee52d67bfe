"""POST /completion in llama.cpp's dialect (and the seed's dialect on the same route), against a real
router and a real SmolLM2 worker."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import raw_post

FINAL_KEYS = ["index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted", "tokens_evaluated",
              "generation_settings", "prompt", "has_new_line", "truncated", "stop_type", "stopping_word",
              "tokens_cached", "timings", "stopped_eos", "stopped_word", "stopped_limit"]
TIMING_KEYS = ["prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second", "predicted_n", "predicted_ms",
               "predicted_per_token_ms", "predicted_per_second"]
PARTIAL_KEYS = ["index", "content", "tokens", "stop", "id_slot", "tokens_predicted", "tokens_evaluated"]


def http_chunks(router, path: str, body: Any, headers: dict[str, str] | None = None
                ) -> tuple[int, dict[str, str], list[bytes]]:
    """POST JSON over a raw socket and return the HTTP/1.1 chunks exactly as the server framed them."""
    return raw_post(router, path, json.dumps(body).encode(),
                    {"Content-Type": "application/json", **router.headers, **(headers or {})})


def llama_events(chunks: list[bytes]) -> list[dict[str, Any]]:
    """Each chunk must be exactly one ``data: <json>\\n\\n`` event (LLM for Unity v3's rule)."""
    events = []
    for chunk in chunks:
        text = chunk.decode()
        assert text.startswith("data: ") and text.endswith("\n\n"), repr(text)
        payload = text[len("data: "):-2]
        assert "\n" not in payload, f"more than one line in one chunk: {text!r}"
        events.append(json.loads(payload))
    return events


def test_non_stream_has_llamacpp_keys_in_order(mesh):
    r = mesh.post("/completion", {"prompt": "The capital of France is", "n_predict": 4, "temperature": 0,
                                  "cache_prompt": True, "id_slot": -1, "n_keep": 0, "tfs_z": 0.0,
                                  "penalize_nl": True, "penalty_prompt": "", "messages": []})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    body = r.json()
    assert list(body)[:len(FINAL_KEYS)] == FINAL_KEYS
    assert isinstance(body["content"], str) and body["content"]
    assert body["tokens"] == [] and body["stop"] is True and body["id_slot"] == -1 and body["index"] == 0
    assert body["model"] == "smollm2-135m-instruct"
    assert body["tokens_predicted"] == 4 and body["tokens_evaluated"] > 0
    assert body["stop_type"] == "limit" and body["stopped_limit"] is True and body["stopped_eos"] is False
    assert body["stopping_word"] == "" and body["truncated"] is False
    assert isinstance(body["has_new_line"], bool)
    assert body["prompt"] == "The capital of France is"
    settings = body["generation_settings"]
    assert settings["n_ctx"] == 2048 and settings["n_predict"] == 4 and settings["temperature"] == 0
    # llama.cpp's defaults for what the request left out
    defaults = (settings["top_k"], settings["top_p"], settings["min_p"], settings["repeat_penalty"])
    assert defaults == (40, 0.95, 0.05, 1.1)
    assert [k for k in body["timings"] if k in TIMING_KEYS] == TIMING_KEYS
    for key in TIMING_KEYS:
        assert isinstance(body["timings"][key], (int, float))
    assert body["timings"]["predicted_n"] == 4
    assert body["tokens_cached"] == body["tokens_evaluated"] + body["tokens_predicted"]


def test_n_predict_zero_only_evaluates_the_prompt(mesh):
    body = mesh.post("/completion", {"prompt": "Hello there", "n_predict": 0}).json()
    assert body["content"] == "" and body["stop"] is True
    assert body["tokens_predicted"] == 0 and body["tokens_evaluated"] > 0


def test_n_predict_minus_one_ends_with_grammar(mesh):
    """n_predict -1 runs to the end of text; a grammar that is complete after one word forces that end."""
    body = mesh.post("/completion", {"prompt": "Is the sky blue? Answer:", "n_predict": -1, "seed": 1,
                                     "grammar": 'root ::= " yes" | " no"'}).json()
    assert body["content"] in (" yes", " no"), body
    assert body["stop_type"] == "eos" and body["generation_settings"]["n_predict"] == -1


def test_grammar_constrains_output(mesh):
    body = mesh.post("/completion", {"prompt": "Pick a colour:", "n_predict": 10, "temperature": 1.0,
                                     "grammar": 'root ::= "red" | "green" | "blue"'}).json()
    assert body["content"] in ("red", "green", "blue")


def test_json_schema_constrains_output(mesh):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    body = mesh.post("/completion", {"prompt": "Reply with JSON:", "n_predict": 30, "temperature": 0,
                                     "json_schema": schema}).json()
    value = json.loads(body["content"])
    assert set(value) == {"ok"} and isinstance(value["ok"], bool)


def test_seed_zero_is_a_fixed_seed(mesh):
    req = {"prompt": "Once upon a time", "n_predict": 6, "temperature": 1.0, "seed": 0}
    first, second = mesh.post("/completion", req).json(), mesh.post("/completion", req).json()
    assert first["content"] == second["content"]
    assert first["generation_settings"]["seed"] == 0


def test_stop_word_is_excluded(mesh):
    body = mesh.post("/completion", {"prompt": "1, 2, 3, 4, 5,", "n_predict": 20, "temperature": 0,
                                     "stop": [" 8"]}).json()
    assert " 8" not in body["content"]
    assert body["stop_type"] == "word" and body["stopping_word"] == " 8" and body["stopped_word"] is True


def test_token_array_and_mixed_prompts(mesh):
    text = "The capital of France is"
    tokens = mesh.post("/tokenize", {"content": text}).json()["tokens"]
    ref = mesh.post("/completion", {"prompt": text, "n_predict": 3, "temperature": 0}).json()
    by_ids = mesh.post("/completion", {"prompt": tokens, "n_predict": 3, "temperature": 0}).json()
    mixed = mesh.post("/completion", {"prompt": [*tokens[:2], mesh.post("/detokenize", {"tokens": tokens[2:]})
                                                 .json()["content"]], "n_predict": 3, "temperature": 0}).json()
    assert by_ids["prompt"] == text and by_ids["content"] == ref["content"]
    assert mixed["content"] == ref["content"]


def test_response_fields(mesh):
    body = mesh.post("/completion", {"prompt": "Hi", "n_predict": 2,
                                     "response_fields": ["content", "generation_settings/n_predict"]}).json()
    assert set(body) == {"content", "generation_settings/n_predict"}
    assert body["generation_settings/n_predict"] == 2


def test_stream_is_one_event_per_chunk_without_done(mesh):
    status, headers, chunks = http_chunks(mesh, "/completion", {"prompt": "The capital of France is",
                                                                "n_predict": 5, "temperature": 0, "stream": True,
                                                                "cache_prompt": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert all(b"[DONE]" not in c and not c.startswith(b":") for c in chunks)
    events = llama_events(chunks)
    *partials, final = events
    assert partials, "no partial events"
    for event in partials:
        assert list(event) == PARTIAL_KEYS
        assert event["stop"] is False and len(event["tokens"]) >= 1 and event["id_slot"] == -1
        assert isinstance(event["content"], str) and event["content"]
    assert final["content"] == "" and final["tokens"] == [] and final["stop"] is True
    assert list(final)[:len(FINAL_KEYS)] == FINAL_KEYS
    assert final["tokens_predicted"] == 5 and final["tokens_evaluated"] > 0
    whole = mesh.post("/completion", {"prompt": "The capital of France is", "n_predict": 5, "temperature": 0})
    assert "".join(e["content"] for e in partials) == whole.json()["content"]


def test_error_before_the_first_piece_is_an_http_status(mesh):
    """An error known before generation starts (the worker refuses an over-long prompt) is the stream's HTTP
    status and error body, as llama.cpp answers it, with llama.cpp's n_prompt_tokens and n_ctx."""
    status, headers, chunks = http_chunks(mesh, "/completion", {"prompt": "hello " * 2100, "n_predict": 2,
                                                                "stream": True})
    assert status == 400 and headers["content-type"].startswith("application/json")
    error = json.loads(b"".join(chunks))["error"]
    assert error["code"] == 400 and isinstance(error["code"], int)
    assert error["type"] == "exceed_context_size_error" and error["message"]
    assert error["n_prompt_tokens"] > error["n_ctx"] == 2048 and "details" in error


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "n_predict": 2, "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "n_predict": -2}, "n_predict"),
    ({"prompt": ["one"] * 17, "n_predict": 2}, "prompt"),
    ({"prompt": ["one", ""], "n_predict": 2}, "prompt[1]"),
    ({"prompt": "x", "n_predict": 2, "n_probs": 1000}, "n_probs"),
    ({"prompt": "x", "n_predict": 2, "grammar": "root ::= \"a\"", "json_schema": {"type": "object"}}, "grammar"),
    ({"n_predict": 2}, "prompt"),
])
def test_errors_have_llamacpp_shape(mesh, body, field):
    r = mesh.post("/completion", body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == 400 and isinstance(error["code"], int)
    assert error["type"] == "invalid_request_error" and field in error["message"]


def test_unknown_model_and_bad_token(mesh):
    r = mesh.post("/completion", {"prompt": "x", "n_predict": 1, "model": "no-such-model"})
    assert r.status_code == 404 and r.json()["error"]["code"] == 404
    r = mesh.post("/completion", {"prompt": "x", "n_predict": 1}, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401  # all LLM for Unity v2 reads; it stops retrying
    assert r.json()["error"]["type"] == "authentication_error"


def test_seed_dialect_still_served_on_completion(mesh):
    body = mesh.post("/completion", {"prompt": "Hello", "max_tokens": 3, "temperature": 0}).json()
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    status, _headers, chunks = http_chunks(mesh, "/completion", {"prompt": "Hello", "max_tokens": 3,
                                                                 "temperature": 0, "stream": True})
    assert status == 200
    assert chunks[-1] == b"data: [DONE]\n\n"
    first = json.loads(chunks[0].decode()[len("data: "):])
    assert "choices" in first


def test_invalid_grammar_is_refused_and_the_worker_lives(mesh):
    r = mesh.post("/completion", {"prompt": "Say yes:", "n_predict": 4, "grammar": "root ::= ["})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == 400 and "grammar" in r.json()["error"]["message"]
    assert mesh.post("/completion", {"prompt": "Say yes:", "n_predict": 2}).status_code == 200


def test_auth_error_in_llamacpp_dialect_has_int_code(mesh):
    import requests

    r = requests.post(mesh.url + "/completion", json={"prompt": "x", "n_predict": 4, "id_slot": -1},
                      headers={"Authorization": "Bearer wrong"}, timeout=10)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_ignore_eos_generates_every_token(mesh):
    r = mesh.post("/completion", {"prompt": "Hi", "n_predict": 40, "ignore_eos": True}).json()
    assert r["tokens_predicted"] == 40 and r["stop_type"] == "limit"


def test_paths_without_a_route_take_their_dialects_error_shape(mesh):
    """404 and 405 are raised before any handler: the dialect that owns the path still shapes the error."""
    r = mesh.get("/tokenize")  # llama.cpp's route, POST only
    assert r.status_code == 405 and r.json()["error"]["code"] == 405
    r = mesh.post("/infill", {"input_prefix": "def f(", "input_suffix": ")"})
    assert r.status_code == 501 and r.json()["error"]["code"] == 501
    r = mesh.get("/sdapi/v1/no-such-endpoint")  # A1111's prefix: its shape has a top-level detail
    assert r.status_code == 404 and r.json()["detail"] and r.json()["error"]["code"] == "not_found"
    r = mesh.get("/no-such-path")  # nobody's: the seed's shape
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found" and "detail" not in r.json()


def test_llamacpp_defaults_are_an_overlay_of_the_mesh_defaults():
    """The llama.cpp dialect lists only the defaults in which llama.cpp differs from the mesh's."""
    import dataclasses

    from velesio.mesh.params import TextParams
    from velesio.router.dialects.llamacpp.completion import DEFAULTS, default_params

    mesh_defaults = {f.name: f.default for f in dataclasses.fields(TextParams)}
    assert DEFAULTS and all(name in mesh_defaults and mesh_defaults[name] != value
                            for name, value in DEFAULTS.items())
    assert default_params().max_tokens == -1 and TextParams().max_tokens == 150


def test_n_keep_and_cache_prompt_are_read_as_llama_cpp_reads_them():
    """n_keep is llama.cpp's int32 (any negative: the whole prompt, -1); cache_prompt false reaches the job."""
    from velesio.router.dialects.llamacpp.completion import parse

    assert parse({"prompt": "x"}).params.n_keep == 0 and parse({"prompt": "x"}).params.cache_prompt
    assert parse({"prompt": "x", "n_keep": 12}).params.n_keep == 12
    assert parse({"prompt": "x", "n_keep": -7}).params.n_keep == -1
    assert not parse({"prompt": "x", "cache_prompt": False}).params.cache_prompt
