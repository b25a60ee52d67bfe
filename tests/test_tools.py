"""OpenAI tool calling on the chat routes (router/dialects/seed/tools.py): the request's validation, the
schema and prompt it becomes, the reply parsed back; then the real ``openai`` SDK against a real router and
SmolLM2 worker. A 135M model chooses poorly: the end-to-end tests check shapes and constraints, not wisdom."""

from __future__ import annotations

import json
from typing import Any

import openai
import pydantic
import pytest

from velesio.mesh.params import TextResult
from velesio.router.dialects.seed import tools
from velesio.router.dialects.seed.openai import OpenAIText, parse_chat
from velesio.router.errors import ApiError
from velesio.router.validation import get_messages

MODEL = "smollm2-135m-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 40}},
                   "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def chat(**body: Any) -> dict[str, Any]:
    return {"messages": ASK, **body}


def refused(body: dict[str, Any]) -> ApiError:
    with pytest.raises(ApiError) as exc:
        parse_chat(body)
    assert exc.value.status == 400
    return exc.value


# ---- the request -------------------------------------------------------------------------------
def test_no_tools_no_plan():
    job = parse_chat(chat())
    assert tools.plan_of(job) is None and job.params.json_schema is None
    assert job.params.messages == ASK
    none = parse_chat(chat(tools=[WEATHER], tool_choice="none"))
    assert tools.plan_of(none) is None and none.params.json_schema is None and none.params.messages == ASK
    assert tools.plan_of(parse_chat(chat(tools=[], tool_choice="auto"))) is None


def test_auto_is_the_default_with_tools():
    plan = tools.get_plan(chat(tools=[WEATHER, TIME]))
    assert plan is not None and plan.choice == "auto" and not plan.parallel and plan.name is None  # llama.cpp's
    assert [f["name"] for f in plan.offered] == ["get_weather", "get_time"]


@pytest.mark.parametrize(("body", "param"), [
    (chat(tools={"type": "function"}), "tools"),
    (chat(tools=[WEATHER] * 129), "tools"),
    (chat(tools=["get_weather"]), "tools[0].type"),
    (chat(tools=[{"type": "code_interpreter"}]), "tools[0].type"),
    (chat(tools=[{"type": "function"}]), "tools[0].function"),
    (chat(tools=[{"type": "function", "function": {"name": "get weather"}}]), "tools[0].function.name"),
    (chat(tools=[{"type": "function", "function": {"name": "x" * 65}}]), "tools[0].function.name"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "description": 3}}]),
     "tools[0].function.description"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": "object"}}]),
     "tools[0].function.parameters"),
    (chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "maxLength": 10**6}}}}}]),
     "tools[0].function.parameters.properties.s.maxLength"),
    (chat(tools=[WEATHER, WEATHER]), "tools"),
    (chat(tools=[WEATHER], tool_choice="sometimes"), "tool_choice"),
    (chat(tools=[WEATHER], tool_choice=7), "tool_choice"),
    (chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_time"}}), "tool_choice"),
    (chat(tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"}), "tool_choice"),
    (chat(tool_choice="required"), "tool_choice"),
    (chat(tools=[WEATHER], parallel_tool_calls="yes"), "parallel_tool_calls"),
    (chat(tools=[WEATHER], functions=[WEATHER["function"]]), "functions"),
    (chat(functions=[WEATHER["function"]], function_call="required"), "function_call"),
    (chat(tools=[WEATHER], grammar='root ::= "x"'), "grammar"),
])
def test_malformed_tools_are_400_naming_the_field(body, param):
    assert refused(body).param == param


def test_nesting_is_bounded():
    """Parameters nested deeper than the bound are a 400, not a recursion error here, on the mesh or in a
    backend; a history's or a reply's deeply nested JSON stays text."""
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    function = {"type": "function", "function": {"name": "f", "parameters": deep}}
    assert refused(chat(tools=[function])).param == "tools[0].function.parameters"
    nested = "[" * 900 + "]" * 900
    history = [{"role": "assistant", "tool_calls": [{"type": "function",
                                                     "function": {"name": "f", "arguments": nested}}]}]
    job = parse_chat({"messages": history, "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert json.loads(job.params.messages[1]["content"])["tool_call"]["arguments"] == nested  # one call
    reply = '{"tool_call": {"name": "f", "arguments": ' + nested + "}}"
    assert OpenAIText(job).render(TextResult(text=reply))["choices"][0]["finish_reason"] == "stop"


def test_required_named_and_legacy_choices():
    required = tools.get_plan(chat(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False))
    assert required is not None and required.choice == "required" and not required.parallel
    named = tools.get_plan(chat(tools=[WEATHER, TIME],
                                tool_choice={"type": "function", "function": {"name": "get_time"}}))
    assert named is not None and named.name == "get_time" and [f["name"] for f in named.offered] == ["get_time"]
    legacy = tools.get_plan(chat(functions=[WEATHER["function"]], function_call={"name": "get_weather"}))
    assert legacy is not None and legacy.legacy and not legacy.parallel and legacy.name == "get_weather"


# ---- the schema --------------------------------------------------------------------------------
def _call_names(schema: dict[str, Any]) -> list[str]:
    one = schema["properties"].get("tool_call") or schema["properties"]["tool_calls"]["items"]
    return [c["properties"]["name"]["const"] for c in one.get("anyOf", [one])]


def test_schema_auto_offers_a_response():
    plan = tools.get_plan(chat(tools=[WEATHER, TIME], parallel_tool_calls=False))
    assert plan is not None
    call, answer = tools.schema(plan)["anyOf"]
    assert call["required"] == ["tool_call"] and _call_names(call) == ["get_weather", "get_time"]
    first = call["properties"]["tool_call"]["anyOf"][0]
    assert first["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert first["required"] == ["name", "arguments"]
    assert answer == {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}


def test_schema_required_named_and_parallel():
    required = tools.schema(tools.get_plan(chat(tools=[WEATHER, TIME], tool_choice="required",
                                                parallel_tool_calls=True)))
    assert "anyOf" not in required and required["required"] == ["tool_calls"]
    assert required["properties"]["tool_calls"]["minItems"] == 1
    assert _call_names(required) == ["get_weather", "get_time"]
    named = tools.schema(tools.get_plan(chat(tools=[WEATHER, TIME], parallel_tool_calls=False,
                                             tool_choice={"type": "function", "function": {"name": "get_time"}})))
    assert "anyOf" not in named and _call_names(named) == ["get_time"]
    assert named["properties"]["tool_call"]["properties"]["name"] == {"type": "string", "const": "get_time"}


def test_response_format_is_the_response_schema():
    job = parse_chat(chat(tools=[WEATHER], response_format={"type": "json_object"}))
    assert job.params.json_schema["anyOf"][1]["properties"]["response"] == {"type": "object"}


def test_function_without_parameters_takes_none():
    plan = tools.get_plan(chat(tools=[{"type": "function", "function": {"name": "ping"}}]))
    assert plan is not None and plan.functions[0]["parameters"] == {"type": "object", "properties": {}}


def test_schema_with_refs_compiles():
    """pydantic's ``$defs`` move to the root, where llama.cpp's converter resolves ``#/...`` refs."""
    gbnf = pytest.importorskip("llama_cpp.llama_grammar")

    class Address(pydantic.BaseModel):
        city: str
        country: str

    class Ship(pydantic.BaseModel):
        to: Address
        weight_kg: float

    plan = tools.get_plan(chat(tools=[openai.pydantic_function_tool(Ship), WEATHER]))
    assert plan is not None
    schema = tools.schema(plan)
    assert set(schema["$defs"]) == {"tool-Ship"}
    assert schema["$defs"]["tool-Ship"]["properties"]["to"]["$ref"] == "#/$defs/tool-Ship/$defs/Address"
    grammar = gbnf.json_schema_to_gbnf(json.dumps(schema))
    assert '"\\"weight_kg\\""' in grammar and '"\\"country\\""' in grammar
    answer = {"type": "object", "properties": {"to": {"$ref": "#/$defs/Place"}}, "required": ["to"],
              "$defs": {"Place": {"type": "object", "properties": {"town": {"type": "string"}}, "required": ["town"]}}}
    job = parse_chat(chat(tools=[WEATHER], response_format={"type": "json_schema",
                                                            "json_schema": {"name": "a", "schema": answer}}))
    assert job.params.json_schema["anyOf"][1]["properties"]["response"] == {"$ref": "#/$defs/response"}
    assert '"\\"town\\""' in gbnf.json_schema_to_gbnf(json.dumps(job.params.json_schema))


# ---- the prompt --------------------------------------------------------------------------------
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "rain"}]},
]


def test_history_is_rendered_as_json_text():
    job = parse_chat({"messages": HISTORY, "tools": [WEATHER]})
    system, user, assistant, results = job.params.messages
    assert system["role"] == "system" and system["content"].startswith("Be brief.\n\nRespond in JSON format")
    assert '"name": "get_weather"' in system["content"] and "`response`" in system["content"]
    assert user == HISTORY[1]
    assert json.loads(assistant["content"]) == {"tool_calls": [
        {"name": "get_weather", "arguments": {"city": "Paris"}},
        {"name": "get_weather", "arguments": {"city": "Rome"}}]}
    assert results["role"] == "user"  # every template takes a user turn; consecutive results are one
    first, second = (json.loads(line) for line in results["content"].split("\n"))
    assert first == {"tool_response": {"tool": "get_weather", "tool_call_id": "call_1", "content": "sunny"}}
    assert second["tool_response"]["content"] == "rain"
    assert all(set(m) == {"role", "content"} and isinstance(m["content"], str) for m in job.params.messages)


def test_history_without_tools_and_single_call():
    messages = [*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "sunny"}]
    job = parse_chat({"messages": messages})
    assert [m["role"] for m in job.params.messages] == ["user", "assistant", "user"]  # no system prompt added
    assert json.loads(job.params.messages[1]["content"]) == {
        "tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "assistant", "tool_calls": "get_weather"}, "messages[0].tool_calls"),
    ({"role": "assistant", "tool_calls": [{"type": "function"}]}, "messages[0].tool_calls[0]"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
     "messages[0].tool_calls[0].function.name"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": 3}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"id": 1, "type": "function", "function": {"name": "f"}}]},
     "messages[0].tool_calls[0].id"),
    ({"role": "tool", "tool_call_id": 5, "content": "x"}, "messages[0].tool_call_id"),
    ({"role": "tool", "content": 5}, "messages[0].content"),
])
def test_malformed_history_is_400(message, param):
    assert refused({"messages": [message]}).param == param


def test_messages_without_tool_fields_drop_them():
    plain = get_messages({"messages": HISTORY})
    assert all(set(m) == {"role", "content"} for m in plain) and plain[2]["content"] == ""
    kept = get_messages({"messages": HISTORY}, tool_fields=True)
    assert kept[2]["tool_calls"][1] == {"id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'}
    assert kept[3]["tool_call_id"] == "call_1"


# ---- the reply ---------------------------------------------------------------------------------
def _plan(**body: Any) -> tools.ToolPlan:
    plan = tools.get_plan(chat(tools=[WEATHER, TIME], **body))
    assert plan is not None
    return plan


def test_a_call_becomes_tool_calls():
    message, finish = tools.message('{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}',
                                    "stop", _plan(parallel_tool_calls=False))
    assert finish == "tool_calls" and message["content"] is None and message["role"] == "assistant"
    (call,) = message["tool_calls"]
    assert call["id"].startswith("call_") and len(call["id"]) > 10 and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}


def test_parallel_calls_have_their_own_ids():
    text = json.dumps({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}},
                                      {"name": "get_time", "arguments": {"zone": "CET"}}]})
    message, finish = tools.message(text, "stop", _plan())
    assert finish == "tool_calls" and [c["function"]["name"] for c in message["tool_calls"]] == ["get_weather",
                                                                                                  "get_time"]
    assert len({c["id"] for c in message["tool_calls"]}) == 2


LAUNCH = '{"tool_call": {"name": "launch", "arguments": {}}}'


@pytest.mark.parametrize(("text", "finish", "content"), [
    ('{"response": "It is sunny."}', "stop", "It is sunny."),
    ('{"response": {"a": 1}}', "stop", '{"a": 1}'),
    ('{"tool_call": {"name": "get_wea', "length", '{"tool_call": {"name": "get_wea'),  # cut by max_tokens
    ('{ "response": "It is \\"sun', "length", 'It is "sun'),  # a cut answer: its text
    ('{"response": "caf\\u00', "length", "caf"),
    ("Hello there", "stop", "Hello there"),  # a backend that ignored the schema
    (LAUNCH, "stop", LAUNCH),  # a tool that was not offered
    ('{"tool_calls": []}', "stop", '{"tool_calls": []}'),
    ("[1, 2]", "stop", "[1, 2]"),
    ("[" * 100000, "length", "[" * 100000),
])
def test_other_text_is_content_as_it_came(text, finish, content):
    assert tools.message(text, finish, _plan()) == ({"role": "assistant", "content": content}, finish)


def test_named_choice_parses_only_that_tool():
    plan = _plan(tool_choice={"type": "function", "function": {"name": "get_time"}})
    text = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "x"}}]}'
    assert tools.message(text, "stop", plan)[1] == "stop"


def test_legacy_functions_answer_function_call():
    plan = tools.get_plan(chat(functions=[WEATHER["function"]]))
    assert plan is not None
    message, finish = tools.message('{"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}',
                                    "stop", plan)
    assert finish == "function_call" and message["function_call"] == {"name": "get_weather",
                                                                      "arguments": '{"city":"Oslo"}'}


def _stream(body: dict[str, Any], pieces: list[str], finish: str = "stop") -> list[dict[str, Any]]:
    renderer = OpenAIText(parse_chat({**body, "stream": True}))
    events = renderer.start()
    for piece in pieces:
        events += renderer.chunk({"text": piece})
    return events + renderer.end(TextResult(text="".join(pieces), finish_reason=finish))


def test_stream_is_buffered_then_tool_call_deltas():
    events = _stream(chat(tools=[WEATHER, TIME]), ['{"tool_calls": [{"name": "get_weather", ',
                                                   '"arguments": {"city": "Paris"}}, ',
                                                   '{"name": "get_time", "arguments": {"zone": "UTC"}}]}'])
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": None}
    assert [d["tool_calls"][0]["index"] for d in deltas[1:3]] == [0, 1]
    assert deltas[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert deltas[3] == {} and events[3]["choices"][0]["finish_reason"] == "tool_calls"
    assert len(events) == 4


def test_stream_of_a_response_or_cut_text():
    response = _stream(chat(tools=[WEATHER]), ['{"response": ', '"Hi!"}'])
    assert [e["choices"][0]["delta"] for e in response] == [{"role": "assistant", "content": None},
                                                            {"content": "Hi!"}, {}]
    cut = _stream(chat(tools=[WEATHER]), ['{"tool_calls": [{"na'], "length")
    assert cut[1]["choices"][0]["delta"] == {"content": '{"tool_calls": [{"na'}
    assert cut[-1]["choices"][0]["finish_reason"] == "length"


def test_sdk_accumulates_the_stream():
    """openai's own stream state (what ``client.chat.completions.stream`` runs) reads our chunks."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    events = _stream(chat(tools=[WEATHER, TIME]), ['{"tool_calls": [{"name": "get_time", "arguments": ',
                                                   '{"zone": "CET"}}]}'])
    state: ChatCompletionStreamState = ChatCompletionStreamState()
    for event in events:
        list(state.handle_chunk(ChatCompletionChunk.model_validate(event)))
    choice = state.get_final_completion().choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"zone": "CET"}


# ---- end to end: the openai SDK against a real router and SmolLM2 ---------------------------------
@pytest.fixture(scope="module")
def client(mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.url + "/v1", api_key=mesh.token, max_retries=0, timeout=120)


def _arguments_fit(call: Any, function: dict[str, Any]) -> dict[str, Any]:
    """The call's arguments, checked against the (flat) parameters schema of ``function``."""
    arguments = json.loads(call.function.arguments)
    parameters = function["parameters"]
    assert set(arguments) == set(parameters["properties"]) and set(parameters["required"]) <= set(arguments)
    assert all(isinstance(v, str) and len(v) <= 40 for v in arguments.values())
    return arguments


def test_sdk_required_tool_call(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       parallel_tool_calls=False, temperature=0, max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    _arguments_fit(call, {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"])
    assert r.usage.completion_tokens > 0


def test_sdk_parallel_calls(client):
    """With parallel calls asked for, a small model may repeat a call until ``max_tokens`` cuts it: then the
    text comes back as it was, with finish "length"."""
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       temperature=0, max_tokens=60, parallel_tool_calls=True)
    choice = r.choices[0]
    if choice.finish_reason == "tool_calls":
        for call in choice.message.tool_calls:
            _arguments_fit(call, {"get_weather": WEATHER, "get_time": TIME}[call.function.name]["function"])
    else:
        assert choice.finish_reason == "length" and choice.message.content.lstrip().startswith('{')


def test_sdk_named_tool_choice_and_second_turn(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], temperature=0,
                                       max_tokens=60, parallel_tool_calls=False,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    _arguments_fit(call, WEATHER["function"])
    history = [*ASK, choice.message,  # the SDK's message object as it came (content None, tool_calls)
               {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees Celsius."}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME],
                                           tool_choice="none", temperature=0, max_tokens=40)
    reply = final.choices[0]
    assert reply.message.tool_calls is None and reply.message.content
    assert reply.finish_reason in ("stop", "length")
    auto = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME], temperature=0,
                                          max_tokens=60)
    choice = auto.choices[0]  # the model's choice: an answer, or another valid call
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_sdk_stream_helper_accumulates_tool_calls(client):
    class GetWeather(pydantic.BaseModel):
        """The current weather in a city."""

        city: str = pydantic.Field(max_length=40)

    with client.chat.completions.stream(model=MODEL, messages=ASK, temperature=0, max_tokens=60,
                                        tools=[openai.pydantic_function_tool(GetWeather)],
                                        tool_choice="required", parallel_tool_calls=False) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    call = choice.message.tool_calls[0]
    assert call.function.name == "GetWeather" and isinstance(call.function.parsed_arguments, GetWeather)
    assert "tool_calls.function.arguments.done" in kinds and "content.delta" not in kinds


def test_sdk_raw_stream_with_tools(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], temperature=0,
                                                 max_tokens=60, tool_choice="required", stream=True,
                                                 parallel_tool_calls=False,
                                                 stream_options={"include_usage": True}))
    *with_choices, usage = chunks
    assert usage.usage.completion_tokens > 0 and with_choices[0].choices[0].delta.role == "assistant"
    calls = [tc for c in with_choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and [tc.index for tc in calls] == list(range(len(calls)))
    assert all(tc.function.name == "get_weather" for tc in calls)
    assert with_choices[-1].choices[0].finish_reason == "tool_calls"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])


def test_sdk_tool_choice_none_is_plain_content(client):
    plain = client.chat.completions.create(model=MODEL, messages=ASK, temperature=0, max_tokens=12)
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=12)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content == plain.choices[0].message.content


def test_sdk_invalid_tool_choice_is_bad_request(client):
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=8,
                                       tool_choice={"type": "function", "function": {"name": "launch_rockets"}})
    assert exc.value.status_code == 400 and "tool_choice" in exc.value.message


def test_seed_route_with_tools_cut_short_is_content(mesh):
    """/chat/completions (the seed's route) too; a call cut by max_tokens is the text as it came."""
    r = mesh.post("/chat/completions", {"messages": ASK, "tools": [WEATHER], "tool_choice": "required",
                                        "temperature": 0, "max_tokens": 3})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["message"]["content"].startswith("{")
    assert "tool_calls" not in choice["message"]
