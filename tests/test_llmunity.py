"""Replays of LLM for Unity's remote-mode request sequences (v2: UnityWebRequest; v3: LlamaLib's C++
client), with each client's own way of parsing the answers, against a real router and SmolLM2 worker."""

from __future__ import annotations

import json
from typing import Any

import requests

from conftest import raw_post

LLMUNITY_TEMPLATES = {"chatml", "alpaca", "gemma", "mistral chat", "mistral instruct", "llama3 chat", "llama chat",
                      "llama", "phi-4-mini", "phi-4", "phi-3.5", "phi-3", "phi", "deepseek-r1", "deepseek-v3",
                      "deepseek-v2", "vicuna", "zephyr", "qwen3", "bitnet"}
SYSTEM = "Answer in one short sentence."
QUESTION = "What is the capital of France?"


# ---- transports ------------------------------------------------------------------------------
class V2Client:
    """LLM for Unity v2.x (LLMCaller.cs): UnityWebRequest, JSON bodies, Bearer key, no /health."""

    def __init__(self, router, key: str | None = None):
        self.router = router
        self.key = router.token if key is None else key

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "X-Unity-Version": "2022.3.45f1",
             "User-Agent": "UnityPlayer/2022.3.45f1 (UnityWebRequest/1.0, libcurl/8.5.0-DEV)"}
        if self.key:
            h["Authorization"] = f"Bearer {self.key}"
        return h

    def post(self, endpoint: str, json_text: str) -> tuple[int, list[bytes]]:
        status, _headers, chunks = raw_post(self.router, "/" + endpoint, json_text.encode(), self.headers())
        return status, chunks


def v2_convert_content(body: str) -> str:
    """LLMCaller.ConvertContent + LLMCharacter.MultiChatContent on the whole body received so far."""
    body = body.strip()
    if body.startswith("data: "):
        parts = [p for p in body.replace("\n\n", "").split("data: ") if p != ""]
        body = '{"data": [' + ",\n".join(parts) + "]}"
        data = json.loads(body)["data"]
    else:
        data = [json.loads(body)]
    return "".join(item["content"] for item in data).strip()


def v2_chat_request(prompt: str, n_keep: int, stream: bool, n_predict: int = -1) -> str:
    """ChatRequest serialised by JsonUtility.ToJson, in field order, with LLM for Unity's default values."""
    request = {
        "prompt": prompt, "id_slot": -1, "temperature": 0.2, "top_k": 40, "top_p": 0.9, "min_p": 0.05,
        "n_predict": n_predict, "n_keep": n_keep, "stream": stream,
        "stop": ["<|im_start|>", "<|im_end|>", "\n<|im_start|>", "\n<|im_end|>"],
        "tfs_z": 0.0, "typical_p": 1.0, "repeat_penalty": 1.1, "repeat_last_n": 64, "penalize_nl": True,
        "presence_penalty": 0.0, "frequency_penalty": 0.0, "penalty_prompt": "", "mirostat": 0,
        "mirostat_tau": 5.0, "mirostat_eta": 0.1, "seed": 0, "ignore_eos": False, "n_probs": 0,
        "cache_prompt": True, "messages": [],
    }
    return json.dumps(request)


def chatml(system: str, user: str) -> tuple[str, str]:
    """LLM for Unity's ChatML template: (system part, whole prompt)."""
    system_part = f"<|im_start|>system\n{system}<|im_end|>\n"
    return system_part, system_part + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


class V3Client:
    """LLM for Unity v3.x (LlamaLib LLMClient over cpp-httplib): every call is a POST with ``stream``."""

    def __init__(self, router):
        self.router = router

    def headers(self, stream: bool, body: bool = True) -> dict[str, str]:
        h = {"Accept": "text/event-stream" if stream else "application/json", "Cache-Control": "no-cache",
             "Authorization": f"Bearer {self.router.token}"}
        if body:
            h["Content-Type"] = "application/json"
        return h

    def call(self, endpoint: str, body: dict[str, Any], stream: bool = False) -> tuple[int, list[bytes]]:
        status, _headers, chunks = raw_post(self.router, endpoint, json.dumps({**body, "stream": stream}).encode(),
                                            self.headers(stream))
        return status, chunks

    def json(self, endpoint: str, body: dict[str, Any]) -> Any:
        status, chunks = self.call(endpoint, body)
        assert status == 200, (status, chunks)
        return json.loads(b"".join(chunks))

    def health(self) -> int:
        status, _headers, _chunks = raw_post(self.router, "/health", None, self.headers(False, body=False))
        return status


def v3_process_chunks(chunks: list[bytes]) -> dict[str, Any]:
    """ResponseConcatenator::process_chunk, once per network chunk: every chunk must parse as one JSON."""
    content, tokens, last = "", [], {}
    for raw in chunks:
        chunk = raw.decode()
        if chunk.startswith("data: "):
            chunk = chunk[len("data: "):]
        chunk = chunk.rstrip("\r\n")
        if chunk == "[DONE]":
            break
        obj = json.loads(chunk)  # a failure here aborts the stream in LLM for Unity v3
        if "error" in obj:
            return {"error": obj["error"]}
        content += obj.get("content", "")
        tokens += obj.get("tokens", [])
        last = obj
    return {**last, "content": content, "tokens": tokens}


def v3_parse_completion(body: dict[str, Any]) -> str:
    """LLM::parse_completion_json: error.code must be an int, else the message is lost."""
    if "error" in body:
        code = body["error"]["code"]
        assert isinstance(code, int) and not isinstance(code, bool), f"error.code is not an int: {code!r}"
        return f"error {code}: {body['error']['message']}"
    return body["content"]


def v3_completion_body(prompt: str, n_keep: int) -> dict[str, Any]:
    return {"prompt": prompt, "id_slot": -1, "n_keep": n_keep, "temperature": 0.2, "top_k": 40, "top_p": 0.9,
            "min_p": 0.05, "n_predict": -1, "typical_p": 1.0, "repeat_penalty": 1.1, "repeat_last_n": 64,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "mirostat": 0, "mirostat_tau": 5.0,
            "mirostat_eta": 0.1, "seed": 0, "ignore_eos": False, "n_probs": 0, "cache_prompt": True}


# ---- v2 ----------------------------------------------------------------------------------------
def test_v2_chat_sequence_stream_and_not(mesh):
    client = V2Client(mesh)
    status, chunks = client.post("template", "{}")
    assert status == 200
    template = json.loads(b"".join(chunks))["template"]
    assert template in LLMUNITY_TEMPLATES and template == "chatml"

    system_part, prompt = chatml(SYSTEM, QUESTION)
    status, chunks = client.post("tokenize", json.dumps({"content": system_part}))
    tokens = json.loads(b"".join(chunks))["tokens"]
    assert status == 200 and tokens and all(isinstance(t, int) for t in tokens)

    # Warmup: n_predict 0
    status, chunks = client.post("completion", v2_chat_request(prompt, len(tokens), stream=False, n_predict=0))
    assert status == 200 and v2_convert_content(b"".join(chunks).decode()) == ""

    # Chat, streamed: the body so far is re-parsed after every network chunk, and must parse every time
    status, chunks = client.post("completion", v2_chat_request(prompt, len(tokens), stream=True))
    assert status == 200
    received, seen = "", []
    for chunk in chunks:
        received += chunk.decode()
        seen.append(v2_convert_content(received))
    streamed = seen[-1]
    assert "Paris" in streamed
    assert json.loads(chunks[-1].decode()[len("data: "):])["stop"] is True

    # Chat, not streamed: ChatResult.content, trimmed
    status, chunks = client.post("completion", v2_chat_request(prompt, len(tokens), stream=False))
    assert status == 200
    result = json.loads(b"".join(chunks))
    assert result["stop"] is True and result["content"].strip() == streamed
    assert "<|im_end|>" not in result["content"]


def test_v2_grammar_appended_by_hand(mesh):
    """v2 appends ``,"grammar":"..."`` to the JsonUtility body when a grammar is set."""
    _system, prompt = chatml(SYSTEM, "Is the sky blue?")
    body = v2_chat_request(prompt, 0, stream=True)
    body = body[:-1] + ',"grammar":' + json.dumps('root ::= "Yes" | "No"') + "}"
    status, chunks = V2Client(mesh).post("completion", body)
    assert status == 200 and v2_convert_content(b"".join(chunks).decode()) in ("Yes", "No")


def test_v2_detokenize_and_bad_key(mesh):
    client = V2Client(mesh)
    _status, chunks = client.post("tokenize", json.dumps({"content": "Hello world"}))
    tokens = json.loads(b"".join(chunks))["tokens"]
    status, chunks = client.post("detokenize", json.dumps({"tokens": tokens}))
    assert status == 200 and json.loads(b"".join(chunks))["content"] == "Hello world"
    status, _chunks = V2Client(mesh, key="wrong").post("template", "{}")
    assert status == 401  # v2 stops retrying on 401 only


# ---- v3 ----------------------------------------------------------------------------------------
def test_v3_chat_sequence(mesh):
    client = V3Client(mesh)
    assert 200 <= client.health() < 300

    system = [{"role": "system", "content": SYSTEM}]
    messages = system + [{"role": "user", "content": QUESTION}]
    # first time only: template + tokenize the system message for n_keep
    system_prompt = client.json("/apply-template", {"messages": system})["prompt"]
    n_keep = len(client.json("/tokenize", {"content": system_prompt})["tokens"])
    assert n_keep > 0
    # every chat: props (context size), template + tokenize (overflow check), final template
    props = client.json("/props", {})
    n_ctx = props["default_generation_settings"]["n_ctx"]
    assert isinstance(n_ctx, int) and n_ctx == 2048
    prompt = client.json("/apply-template", {"messages": messages})["prompt"]
    assert isinstance(prompt, str) and SYSTEM in prompt and QUESTION in prompt
    assert len(client.json("/tokenize", {"content": prompt})["tokens"]) < n_ctx

    status, chunks = client.call("/completion", v3_completion_body(prompt, n_keep), stream=True)
    assert status == 200 and chunks
    streamed = v3_process_chunks(chunks)
    assert "error" not in streamed
    assert "Paris" in v3_parse_completion(streamed) and streamed["stop"] is True
    # each event carries its piece's token ids, as llama.cpp's server sends them
    assert streamed["tokens"] and all(isinstance(t, int) for t in streamed["tokens"])

    status, chunks = client.call("/completion", v3_completion_body(prompt, n_keep), stream=False)
    assert status == 200
    assert v3_parse_completion(json.loads(b"".join(chunks))) == streamed["content"]


def test_v3_grammar_as_json_schema(mesh):
    client = V3Client(mesh)
    schema = {"type": "object", "properties": {"capital": {"type": "string", "enum": ["Paris", "Lyon"]}},
              "required": ["capital"]}
    prompt = client.json("/apply-template", {"messages": [{"role": "user", "content": QUESTION}]})["prompt"]
    body = {"prompt": prompt, "id_slot": -1, "n_keep": 0, "json_schema": schema,
            **{k: v for k, v in v3_completion_body(prompt, 0).items() if k not in ("prompt", "id_slot", "n_keep")}}
    body["n_predict"] = 40
    status, chunks = client.call("/completion", body, stream=True)
    assert status == 200
    assert json.loads(v3_parse_completion(v3_process_chunks(chunks)))["capital"] in ("Paris", "Lyon")


def test_v3_errors_carry_int_codes(mesh):
    client = V3Client(mesh)
    body = v3_completion_body("hello " * 2100, 0)  # longer than the model's context
    status, chunks = client.call("/completion", body, stream=False)
    assert status == 400
    assert v3_parse_completion(json.loads(b"".join(chunks))).startswith("error 400: ")
    status, chunks = client.call("/completion", body, stream=True)
    streamed = v3_process_chunks(chunks)
    assert v3_parse_completion(streamed).startswith("error 400: ")
    status, chunks = client.call("/tokenize", {"content": 12})
    assert status == 400 and v3_parse_completion(json.loads(b"".join(chunks))).startswith("error 400: ")


def test_v3_detokenize_and_health_without_key(mesh):
    client = V3Client(mesh)
    tokens = client.json("/tokenize", {"content": "Hello world"})["tokens"]
    # /detokenize is sent without "stream"
    status, _h, chunks = raw_post(mesh, "/detokenize", json.dumps({"tokens": tokens}).encode(), client.headers(False))
    assert status == 200 and json.loads(b"".join(chunks))["content"] == "Hello world"
    status, _h, _chunks = raw_post(mesh, "/health", None, {})
    assert status == 200


# ---- other llama.cpp routes ----------------------------------------------------------------------
def test_props_get_and_post_and_slots(mesh):
    for r in (mesh.get("/props"), mesh.post("/props", {"stream": False})):
        assert r.status_code == 200
        props = r.json()
        settings = props["default_generation_settings"]
        assert settings["n_ctx"] == 2048 and settings["model"] == "smollm2-135m-instruct"
        assert settings["params"]["temperature"] == 0.8 and settings["params"]["top_k"] == 40
        assert props["total_slots"] == 1 and props["model_path"].endswith(".gguf")
        assert "<|im_start|>" in props["chat_template"]
        assert props["modalities"] == {"vision": False, "audio": False} and props["build_info"]
    slots = mesh.get("/slots").json()
    assert [s["id"] for s in slots] == [0] and slots[0]["n_ctx"] == 2048


def test_tokenize_options(mesh):
    pieces = mesh.post("/tokenize", {"content": "Hello world", "with_pieces": True}).json()["tokens"]
    assert [p["piece"] for p in pieces] == ["Hello", " world"] and all(isinstance(p["id"], int) for p in pieces)
    assert mesh.post("/tokenize", {}).json() == {"tokens": []}


def test_template_errors_use_llamacpp_shape(mesh):
    r = mesh.post("/apply-template", {"messages": "nope"})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400
    r = mesh.post("/detokenize", {"tokens": ["a"]})
    assert r.status_code == 400 and r.json()["error"]["code"] == 400


def test_embeddings_are_served_by_the_embedded_model_by_default(mesh):
    """The test mesh's SmolLM2 entry says nothing about embeddings: the embedded model serves them anyway
    (a model without them answers 400 saying how to enable them: tests/test_hostile_input.py)."""
    for path in ("/embeddings", "/v1/embeddings"):
        r = mesh.post(path, {"content": "hello", "input": "hello"})
        assert r.status_code == 200, r.text


def test_embeddings_shapes(start_router, start_worker):
    router = start_router()
    model = {"name": "smollm2-135m-instruct", "backend": "llama-cpp", "slots": 1,
             "options": {"n_ctx": 512, "n_threads": 1, "embeddings": True}}
    start_worker(router, "embed-1", [model])
    router.wait_for(lambda h: any(m["name"] == model["name"] for w in h["workers"] for m in w["models"]))
    # LLM for Unity v3 / current llama.cpp: a top-level array
    v3 = V3Client(router)
    status, _h, chunks = raw_post(router, "/embeddings", json.dumps({"content": "hello"}).encode(), v3.headers(False))
    assert status == 200
    vector = json.loads(b"".join(chunks))[0]["embedding"]
    assert len(vector) > 16 and all(isinstance(x, float) for x in vector)
    # LLM for Unity v2 (UnityWebRequest sends X-Unity-Version): {"embedding": [...]}
    status, chunks = V2Client(router).post("embeddings", json.dumps({"content": "hello"}))
    assert status == 200 and json.loads(b"".join(chunks))["embedding"] == vector
    # OpenAI
    body = router.post("/v1/embeddings", {"input": ["hello", "world"], "model": "smollm2-135m-instruct"}).json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    assert body["data"][0]["embedding"] == vector and body["model"] == "smollm2-135m-instruct"


def test_cors_preflight_needs_no_key(mesh):
    for path in ("/completion", "/tokenize", "/v1/chat/completions"):
        r = requests.options(mesh.url + path, headers={"Origin": "http://game.example",
                                                       "Access-Control-Request-Method": "POST",
                                                       "Access-Control-Request-Headers": "authorization,content-type"},
                             timeout=10)
        assert r.status_code in (200, 204)
        assert r.headers["Access-Control-Allow-Origin"] == "http://game.example"
        assert "POST" in r.headers["Access-Control-Allow-Methods"]
        assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    r = mesh.post("/tokenize", {"content": "hi"}, headers={"Origin": "http://game.example"})
    assert r.headers["Access-Control-Allow-Origin"] == "http://game.example"
