"""llama.cpp and OpenAI fidelity on the text routes, against real router and SmolLM2 worker processes: model
names and aliases, the model listing, /completions, errors known before a stream's first byte, output
constraints on the chat routes, /apply-template's add_generation_prompt, and the first chat stream chunk."""

from __future__ import annotations

import json

import openai
import pytest
import requests

from conftest import SMOLLM2, sse_events
from velesio.router import aliases

MODEL = "smollm2-135m-instruct"
N_CTX = 512
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def router(start_router, start_worker):
    router = start_router({"model_aliases": {"gpt-3.5-turbo": MODEL}})
    start_worker(router, "fidelity-1", [{**SMOLLM2, "options": {"n_ctx": N_CTX, "n_threads": 1}}])
    return router


@pytest.fixture(scope="module")
def client(router) -> openai.OpenAI:
    return openai.OpenAI(base_url=router.url + "/v1", api_key=router.token, max_retries=0, timeout=120)


def stream(router, path: str, body: dict) -> requests.Response:
    return requests.post(router.url + path, json={**body, "stream": True}, headers=router.headers, stream=True,
                         timeout=120)


# ---- model names --------------------------------------------------------------------------------------
def test_an_alias_serves_an_openai_model_name(router, client):
    r = client.chat.completions.create(model="gpt-3.5-turbo", messages=FRANCE, max_tokens=4, temperature=0)
    assert r.model == MODEL and r.choices[0].message.content


def test_an_unknown_name_without_an_alias_is_404(router, client):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="davinci-002", messages=FRANCE, max_tokens=2)
    r = router.post("/completion", {"prompt": "x", "n_predict": 1, "model": "davinci-002"})
    assert r.status_code == 404 and r.json()["error"]["code"] == 404


def test_the_catch_all_alias(start_router, start_worker):
    router = start_router({"model_aliases": {"*": MODEL}})
    start_worker(router, "fidelity-any", [{**SMOLLM2, "options": {"n_ctx": 256, "n_threads": 1}}])
    for name in ("davinci-002", "gpt-4o", MODEL):
        r = router.post("/v1/completions", {"model": name, "prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == MODEL, r.text
    # an image request naming an unknown checkpoint is not sent to a text model
    r = router.post("/sdapi/v1/txt2img", {"prompt": "x", "model": "sd-xl"})
    assert r.status_code in (404, 503), r.text


def test_context_shift_goes_on_past_the_context(start_router, start_worker):
    """A model with options.context_shift generates past its context as llama.cpp's --context-shift does
    (llama.cpp's test_ctx_shift_enabled): n_predict tokens, truncated true, n_keep echoed."""
    router = start_router()
    start_worker(router, "fidelity-shift", [{**SMOLLM2, "options": {"n_ctx": 256, "n_threads": 1,
                                                                     "context_shift": True}}])
    r = router.post("/completion", {"prompt": "Once upon a time", "n_predict": 300, "ignore_eos": True,
                                    "n_keep": -1, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["timings"]["predicted_n"] == 300 and body["truncated"] is True and body["stop_type"] == "limit"
    assert body["generation_settings"]["n_keep"] == -1
    short = router.post("/completion", {"prompt": "Once upon a time", "n_predict": 8, "ignore_eos": True}).json()
    assert short["truncated"] is False


def test_alias_resolution_rules():
    live = {"m": {"operations": ["completion", "chat"]}, "img": {"operations": ["txt2img"]}}
    table = {"gpt-4": "m", "*": "m"}
    assert aliases.resolve(table, "gpt-4", "chat", live, set(live)) == "m"
    assert aliases.resolve(table, "unknown", "chat", live, set(live)) == "m"
    assert aliases.resolve(table, "img", "txt2img", live, set(live)) == "img"  # served names stay
    assert aliases.resolve(table, "gone", "chat", live, {*live, "gone"}) == "gone"  # a restarting model waits
    assert aliases.resolve(table, "sd-xl", "txt2img", live, set(live)) == "sd-xl"  # "*" does not draw
    assert aliases.resolve(table, None, "chat", live, set(live)) is None
    assert aliases.resolve({}, "x", "chat", live, set(live)) == "x"


# ---- listing and /completions -------------------------------------------------------------------------------
def test_models_carries_both_shapes(router):
    body = router.get("/models").json()
    assert [m["name"] for m in body["text_models"]] == [MODEL] and body["image_models"] == []
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL]
    assert body["data"][0]["object"] == "model" and body["data"][0]["meta"]["n_ctx"] == N_CTX


def test_completions_is_llamacpps_alias_of_completion(router):
    llama = router.post("/completions", {"prompt": "Hello", "n_predict": 2, "temperature": 0}).json()
    assert llama["stop"] is True and "content" in llama and llama["tokens_predicted"] == 2
    seed = router.post("/completions", {"prompt": "Hello", "max_tokens": 2, "temperature": 0}).json()
    assert seed["object"] == "text_completion"
    err = router.post("/completions", {"prompt": "x", "n_predict": -5})
    assert err.status_code == 400 and err.json()["error"]["code"] == 400  # llama.cpp's error shape


# ---- errors known before the first byte ----------------------------------------------------------------------
LONG_CHAT = [{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}] * 100


@pytest.mark.parametrize("path, body", [
    ("/chat/completions", {"messages": LONG_CHAT}),
    ("/v1/chat/completions", {"messages": LONG_CHAT}),
    ("/completion", {"prompt": "hello " * 700, "n_predict": 2}),
    ("/v1/completions", {"prompt": "hello " * 700, "max_tokens": 2}),
])
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "stream"])
def test_context_exceeded_is_an_http_400_with_the_counts(router, path, body, streamed):
    r = stream(router, path, body) if streamed else router.post(path, body)
    assert r.status_code == 400, r.text
    assert r.headers["Content-Type"].startswith("application/json") and r.headers["X-Request-Id"]
    err = r.json()["error"]
    assert err["type"] == "exceed_context_size_error" and "exceeds the available context size" in err["message"]
    assert err["n_prompt_tokens"] > N_CTX and err["n_ctx"] == N_CTX


def test_context_exceeded_reaches_the_openai_sdk_at_create(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=LONG_CHAT, stream=True)
    assert exc.value.status_code == 400 and exc.value.body["n_ctx"] == N_CTX


@pytest.mark.parametrize("path, body, status", [
    ("/completion", {"prompt": "Say yes:", "n_predict": 4, "grammar": "root ::= ["}, 400),
    ("/v1/chat/completions", {"messages": FRANCE, "grammar": "root ::= ["}, 400),
    ("/v1/chat/completions", {"messages": FRANCE, "json_schema": {"type": "nonsense"}}, 400),
    ("/v1/chat/completions", {"messages": FRANCE, "model": "no-such-model"}, 404),
    ("/completion", {"prompt": "x", "n_predict": 4, "model": "no-such-model"}, 404),
])
def test_a_stream_whose_error_is_known_before_generation_gets_the_status(router, path, body, status):
    r = stream(router, path, body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["message"]


def test_a_stream_that_starts_well_is_still_a_stream(router):
    events = sse_events(stream(router, "/completion", {"prompt": "The capital of France is", "n_predict": 3}))
    assert json.loads(events[-1])["stop"] is True and len(events) >= 2


# ---- output constraints on the chat routes -------------------------------------------------------------
@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions"])
def test_chat_honours_grammar(router, path):
    body = {"messages": [{"role": "user", "content": "Pick a colour."}], "max_tokens": 8,
            "grammar": 'root ::= "red" | "green" | "blue"'}
    r = router.post(path, body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] in ("red", "green", "blue")


SCHEMA = {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"],
          "additionalProperties": False}


@pytest.mark.parametrize("constraint", [
    {"json_schema": SCHEMA},
    {"response_format": {"type": "json_object", "schema": SCHEMA}},
    {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}},
], ids=["json_schema", "json_object-schema", "json_schema-format"])
def test_chat_honours_json_schemas(router, constraint):
    body = {"messages": [{"role": "user", "content": "Is the sky blue? Answer in JSON."}], "max_tokens": 24,
            **constraint}
    r = router.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    assert isinstance(json.loads(r.json()["choices"][0]["message"]["content"])["answer"], bool)


@pytest.mark.parametrize("body, word", [
    ({"grammar": "root ::= ["}, "grammar"),
    ({"json_schema": {"type": "nonsense"}}, "json_schema"),
    ({"response_format": {"type": "json_object", "schema": {"type": "array", "items": 5}}}, "json_schema"),
    ({"grammar": 'root ::= "a"', "json_schema": SCHEMA}, "grammar"),
    ({"json_schema": SCHEMA, "response_format": {"type": "json_object"}}, "response_format"),
    ({"json_schema": "object"}, "json_schema"),
])
def test_an_invalid_constraint_is_400(router, body, word):
    r = router.post("/v1/chat/completions", {"messages": FRANCE, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert word in r.json()["error"]["message"]


# ---- templates and the first chat chunk -------------------------------------------------------------------
def test_apply_template_add_generation_prompt(router):
    messages = [{"role": "user", "content": "Hi"}]
    opened = router.post("/apply-template", {"messages": messages}).json()["prompt"]
    closed = router.post("/apply-template", {"messages": messages, "add_generation_prompt": False}).json()["prompt"]
    assert opened.endswith("<|im_start|>assistant\n") and opened.startswith(closed)
    assert not closed.endswith("assistant\n") and closed.endswith("<|im_end|>\n")


def test_first_chat_chunk_has_a_null_content(router, client):
    events = [json.loads(e) for e in sse_events(stream(router, "/v1/chat/completions",
                                                       {"messages": FRANCE, "max_tokens": 3})) if e != "[DONE]"]
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    chunks = list(client.chat.completions.create(model=MODEL, messages=FRANCE, max_tokens=3, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content is None


# ---- POST /completion for clients of either API ------------------------------------------------------
def test_a_body_of_common_fields_gets_both_shapes(router):
    body = router.post("/completion", {"prompt": "The sky is", "temperature": 0, "max_tokens": 4, "seed": 1}).json()
    assert body["object"] == "text_completion" and body["choices"][0]["text"]  # the seed's
    assert body["content"] == body["choices"][0]["text"] and body["stop"] is True  # llama.cpp's
    assert body["tokens_predicted"] == body["usage"]["completion_tokens"] and "timings" in body
    raw = sse_events(stream(router, "/completion", {"prompt": "The sky is", "temperature": 0, "max_tokens": 4}))
    assert raw[-1] == "[DONE]"
    events = [json.loads(e) for e in raw[:-1]]
    assert "".join(e["content"] for e in events) == "".join(e["choices"][0]["text"] for e in events if e["choices"])
    assert [e["stop"] for e in events][-1] is True and not any(e["stop"] for e in events[:-1])


def test_prompt_objects_and_token_arrays_are_llamacpp_prompts(router):
    one = router.post("/completion", {"prompt": {"prompt_string": "The sky is"}, "temperature": 0, "max_tokens": 3})
    assert one.status_code == 200 and one.json()["content"], one.text
    ids = router.post("/tokenize", {"content": "The sky is"}).json()["tokens"]
    many = router.post("/completion", {"prompt": [ids, {"prompt_string": "The sky is"}], "temperature": 0,
                                       "max_tokens": 3})
    assert many.status_code == 200 and [r["content"] for r in many.json()] == [one.json()["content"]] * 2
    image = router.post("/completion", {"prompt": {"prompt_string": "<__media__>", "multimodal_data": ["aGk="]}})
    assert image.status_code == 400 and "multimodal" in image.json()["error"]["message"]


def test_generation_settings_list_the_logit_biases(router):
    body = router.post("/completion", {"prompt": "Hi", "n_predict": 2, "ignore_eos": True,
                                       "logit_bias": [[42, -1.5], [43, False]]}).json()
    bias = body["generation_settings"]["logit_bias"]
    assert {"bias": -1.5, "token": 42} in bias and {"bias": None, "token": 43} in bias
    eog = [b for b in bias if b["token"] not in (42, 43)]
    assert eog and all(b["bias"] is None for b in eog)  # ignore_eos bans the end-of-generation tokens
    plain = router.post("/completion", {"prompt": "Hi", "n_predict": 2}).json()
    assert plain["generation_settings"]["logit_bias"] == []


def test_a_cors_preflight_is_200(router):
    r = requests.options(router.url + "/completions", headers={"Origin": "http://localhost",
                                                               "Access-Control-Request-Method": "POST"}, timeout=30)
    assert r.status_code == 200


def test_a_final_assistant_message_is_continued(router):
    turns = [{"role": "user", "content": "What is the best book?"}, {"role": "assistant", "content": "Whill"}]
    prompt = router.post("/apply-template", {"messages": turns}).json()["prompt"]
    assert prompt.endswith("<|im_start|>assistant\nWhill")  # prefilled, as llama.cpp renders it
    explicit = router.post("/apply-template", {"messages": turns, "add_generation_prompt": False,
                                               "continue_final_message": True}).json()["prompt"]
    assert explicit == prompt
    closed = router.post("/apply-template", {"messages": turns, "add_generation_prompt": False}).json()["prompt"]
    assert closed.endswith("Whill<|im_end|>\n")
    r = router.post("/v1/chat/completions", {"messages": turns, "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and not r.json()["choices"][0]["message"]["content"].startswith("Whill")
    for bad in ({"messages": turns, "continue_final_message": True, "add_generation_prompt": True},
                {"messages": turns[:1], "continue_final_message": True},
                {"messages": [*turns, {"role": "assistant", "content": "again"}]}):
        r = router.post("/v1/chat/completions", {**bad, "max_tokens": 2})
        assert r.status_code == 400, (bad, r.text)


def test_input_tokens_counts_a_chats_prompt(router):
    chat = router.post("/v1/chat/completions", {"messages": FRANCE, "max_tokens": 1}).json()
    for path in ("/chat/completions/input_tokens", "/v1/chat/completions/input_tokens"):
        r = router.post(path, {"messages": FRANCE})
        assert r.status_code == 200 and r.json() == {"input_tokens": chat["usage"]["prompt_tokens"]}, r.text
    assert router.post("/chat/completions/input_tokens", {"messages": []}).status_code == 400


def test_timings_on_openai_answers_and_truncated_at_a_full_context(router):
    whole = router.post("/v1/chat/completions", {"messages": FRANCE, "max_tokens": 3}).json()
    assert whole["timings"]["predicted_n"] == whole["usage"]["completion_tokens"]
    raw = sse_events(stream(router, "/v1/chat/completions", {"messages": FRANCE, "max_tokens": 3,
                                                             "stream_options": {"include_usage": True}}))
    last = json.loads(raw[-2])
    assert last["choices"] == [] and last["usage"]
    assert last["timings"]["predicted_n"] == last["usage"]["completion_tokens"]
    full = router.post("/completion", {"prompt": "Hi", "n_predict": -1, "ignore_eos": True}).json()
    assert full["truncated"] is True and full["tokens_evaluated"] + full["tokens_predicted"] == N_CTX
    short = router.post("/completion", {"prompt": "Hi", "n_predict": 3, "ignore_eos": True}).json()
    assert short["truncated"] is False and short["stop_type"] == "limit"
