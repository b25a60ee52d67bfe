"""OpenAI tool (function) calling on the chat routes, served the generic way llama.cpp serves a chat template
that knows nothing of tools (``common_chat_params_init_generic`` in its common/chat.cpp), so that every model
can call tools, whatever its template:

- the tools are listed in the system message, with an instruction to answer in JSON;
- the reply is constrained by a JSON schema (the job's ``json_schema``, which the backends compile to a
  grammar): ``{"tool_call": {"name", "arguments"}}`` (``{"tool_calls": [...]}`` when parallel calls are
  allowed), or ``{"response": "<text>"}`` where the model may answer without a tool (``tool_choice`` auto);
- earlier turns are rendered in that same JSON: an assistant's ``tool_calls`` become that JSON as its
  content, a ``tool`` result a user message ``{"tool_response": {...}}`` (the one role every chat template
  takes after an assistant's turn);
- the reply is parsed back into OpenAI's ``message.tool_calls`` (or ``content``).

All of it happens at the router's edge: a worker receives an ordinary chat job with a JSON schema, so any
backend that honours ``json_schema`` serves tools and none needs to know about them. The legacy
``functions`` / ``function_call`` fields are read as one-call tools and answered in their own shape
(``message.function_call``)."""

from __future__ import annotations

import dataclasses
import json
import re
import uuid
from typing import Any

from velesio.mesh.jobs import Job

from ...errors import invalid
from ...validation import check_json_schema, get_bool

MAX_TOOLS = 128  # as OpenAI: more would not fit a small model's context anyway
NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # OpenAI's rule for a function name
MAX_DEPTH = 64  # nesting of a tool's parameters: deeper would exhaust recursion here, on the mesh or in a backend
CHOICES = '"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'


@dataclasses.dataclass(frozen=True)
class ToolPlan:
    """What a request asked of tools, once validated. ``choice`` is "auto", "required" or "function" (then
    ``name`` is the one tool the model must call); a request with ``tool_choice: "none"`` has no plan."""

    functions: list[dict[str, Any]]  # [{"name", "description"?, "parameters"}]
    choice: str = "auto"
    name: str | None = None
    parallel: bool = False  # llama.cpp's default (OpenAI's is true): one call per reply unless asked
    legacy: bool = False  # functions / function_call: answer with message.function_call

    @property
    def offered(self) -> list[dict[str, Any]]:
        """The functions the model may call: the named one, or all of them."""
        return [f for f in self.functions if f["name"] == self.name] if self.name else self.functions


@dataclasses.dataclass
class ToolJob(Job):
    """A chat job whose reply is read as tool calls. The plan stays on the router, for the renderer: only
    ``Job``'s fields go over the mesh, so a worker sees an ordinary chat job."""

    tools: ToolPlan | None = None


def with_plan(job: Job, plan: ToolPlan | None) -> Job:
    """``job`` carrying ``plan`` for its renderer (unchanged without one)."""
    if plan is None:
        return job
    return ToolJob(op=job.op, model=job.model, params=job.params, stream=job.stream, id=job.id, tools=plan)


def plan_of(job: Job) -> ToolPlan | None:
    return job.tools if isinstance(job, ToolJob) else None


# ---- the request -------------------------------------------------------------------------------
def _depth(value: Any) -> int:
    """How deeply ``value`` nests objects and arrays, counted without recursion (so without a limit)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        for child in children:
            if isinstance(child, (dict, list)):
                todo.append((child, depth + 1))
        deepest = max(deepest, depth)
    return deepest


def _function(value: Any, where: str) -> dict[str, Any]:
    """One function declaration, ``{"name", "description"?, "parameters"}``; 400 naming the field."""
    if not isinstance(value, dict):
        raise invalid(where, "must be an object with name, description and parameters")
    name = value.get("name")
    if not isinstance(name, str) or not NAME.match(name):
        raise invalid(f"{where}.name", "must be 1 to 64 letters, digits, underscores or dashes")
    description = value.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid(f"{where}.description", "must be a string")
    if value.get("strict") is not None and not isinstance(value.get("strict"), bool):
        raise invalid(f"{where}.strict", "must be true or false")
    parameters = value.get("parameters")
    if parameters is None:  # a function without parameters takes no arguments (OpenAI)
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, dict):
        raise invalid(f"{where}.parameters", "must be a JSON schema object")
    if _depth(parameters) > MAX_DEPTH:
        raise invalid(f"{where}.parameters", f"is nested more than {MAX_DEPTH} levels deep")
    check_json_schema(parameters, f"{where}.parameters")
    out: dict[str, Any] = {"name": name}
    if description:
        out["description"] = description
    out["parameters"] = parameters or {"type": "object"}
    return out


def _declared(body: dict[str, Any]) -> tuple[list[dict[str, Any]], bool]:
    """The functions ``tools`` (or the legacy ``functions``) declare, and whether they came as legacy."""
    tools, functions = body.get("tools"), body.get("functions")
    if tools is not None and functions is not None:
        raise invalid("functions", 'either "tools" or the legacy "functions" can be given, not both')
    field, items = ("functions", functions) if functions is not None else ("tools", tools)
    if items is None:
        return [], False
    if not isinstance(items, list) or len(items) > MAX_TOOLS:
        raise invalid(field, f"must be an array of at most {MAX_TOOLS} tools")
    declared = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if field == "tools":
            if not isinstance(item, dict) or item.get("type") != "function":
                raise invalid(f"{where}.type", 'only "function" tools are supported')
            item, where = item.get("function"), f"{where}.function"
        declared.append(_function(item, where))
    names = [f["name"] for f in declared]
    if len(set(names)) != len(names):
        raise invalid(field, "each tool needs a name of its own")
    return declared, field == "functions"


def _choice(body: dict[str, Any], names: list[str], legacy: bool) -> tuple[str, str | None]:
    """``tool_choice`` (or the legacy ``function_call``) as (choice, name); "auto" when tools are given."""
    field = "function_call" if legacy else "tool_choice"
    forms = '"none", "auto" or {"name": ...}' if legacy else CHOICES
    value = body.get(field)
    if value is None:
        return ("auto" if names else "none"), None
    if isinstance(value, str):
        if value not in ("none", "auto", "required") or (legacy and value == "required"):
            raise invalid(field, f"must be {forms}")
        if value == "required" and not names:
            raise invalid(field, '"required" needs "tools"')
        return value, None
    function = value.get("function") if isinstance(value, dict) and not legacy else value
    if (not legacy and (not isinstance(value, dict) or value.get("type") != "function")) or not isinstance(
            function, dict):
        raise invalid(field, f"must be {forms}")
    name = function.get("name")
    if name not in names:
        raise invalid(field, f"names no declared tool: {str(name)[:64]!r}")
    return "function", name


def get_plan(body: dict[str, Any]) -> ToolPlan | None:
    """The tools of a chat request, validated (400 naming the field); None when the model is not to call
    any (no tools, or ``tool_choice: "none"``)."""
    functions, legacy = _declared(body)
    choice, name = _choice(body, [f["name"] for f in functions], legacy)
    # Default false, as llama.cpp's server: a small model offered a list of calls tends to repeat one until
    # max_tokens cuts the reply; a client that wants several calls in one reply says so.
    parallel = get_bool(body, "parallel_tool_calls", False) and not legacy
    if not functions or choice == "none":
        return None
    return ToolPlan(functions, choice, name, parallel, legacy)


# ---- the constraint ----------------------------------------------------------------------------
def _rebased(value: Any, base: str) -> Any:
    """``value`` with its local ``$ref``s ("#/...", "#") pointing under ``base``, where the schema will sit."""
    if isinstance(value, list):
        return [_rebased(v, base) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: _rebased(v, base) for k, v in value.items()}
    ref = value.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        out["$ref"] = base + ref[1:]
    return out


def _has_ref(value: Any) -> bool:
    if isinstance(value, dict):
        return isinstance(value.get("$ref"), str) or any(_has_ref(v) for v in value.values())
    return isinstance(value, list) and any(_has_ref(v) for v in value)


def _nested(schema: dict[str, Any], key: str, defs: dict[str, Any]) -> dict[str, Any]:
    """``schema``, to be nested in the reply's schema. One with local ``$ref``s (pydantic's ``$defs``) moves
    into the root's ``defs`` under ``key``: a ref resolves against the whole schema, no longer its own."""
    if not _has_ref(schema):
        return schema
    defs[key] = _rebased(schema, f"#/$defs/{key}")
    return {"$ref": f"#/$defs/{key}"}


def _call_schema(function: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One call of ``function``: its name, and arguments its parameters allow."""
    arguments = _nested(function["parameters"], "tool-" + function["name"], defs)
    return {"type": "object", "properties": {"name": {"type": "string", "const": function["name"]},
                                             "arguments": arguments},
            "required": ["name", "arguments"]}


def schema(plan: ToolPlan, response: dict[str, Any] | None = None) -> dict[str, Any]:
    """The JSON schema of the reply: a call (``tool_call``, or a list ``tool_calls`` with parallel calls) of
    an offered tool, or, with ``tool_choice`` auto, ``{"response": ...}`` (a string, else ``response``: the
    request's own ``response_format`` schema)."""
    defs: dict[str, Any] = {}
    calls = [_call_schema(f, defs) for f in plan.offered]
    one = calls[0] if len(calls) == 1 else {"anyOf": calls}
    key, value = ("tool_calls", {"type": "array", "items": one, "minItems": 1}) if plan.parallel else ("tool_call", one)
    out: dict[str, Any] = {"type": "object", "properties": {key: value}, "required": [key]}
    if plan.choice == "auto":
        answer = {"type": "object", "required": ["response"],
                  "properties": {"response": _nested(response, "response", defs) if response else {"type": "string"}}}
        out = {"anyOf": [out, answer]}
    return {**out, "$defs": defs} if defs else out


def constrain(params: dict[str, Any], plan: ToolPlan | None) -> dict[str, Any]:
    """The job's parameters with the reply constrained to ``schema(plan)``; a ``json_schema`` the request
    gave (``response_format``) becomes the schema of ``response``. A GBNF ``grammar`` cannot be combined."""
    if plan is None:
        return params
    if params.get("grammar"):
        raise invalid("grammar", '"grammar" cannot be combined with "tools" (use response_format)')
    return {**params, "json_schema": schema(plan, params.get("json_schema"))}


# ---- the prompt --------------------------------------------------------------------------------
def system_prompt(plan: ToolPlan) -> str:
    """What the model is told: llama.cpp's generic instruction and tool list, fitted to the choice."""
    target = f"the tool `{plan.name}`" if plan.name else "tools"
    key = (f"`tool_calls` (a list of requests to call {target})" if plan.parallel
           else f"`tool_call` (a request to call {target})")
    how = f"either with {key} or with `response` reply to the user's request" if plan.choice == "auto" else (
        f"with {key}")
    tools = json.dumps([{"type": "function", "function": f} for f in plan.offered], indent=2, ensure_ascii=False)
    return (f"Respond in JSON format, {how}.\n\n"
            f"You can call any of the following tools to satisfy the user's requests: {tools}")


def _arguments(text: str) -> Any:
    """A call's arguments (JSON text) as the value the model writes; kept as text when it is not JSON (or
    nests too deeply to be written again)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if _depth(value) <= MAX_DEPTH else text


def _calls_text(calls: list[dict[str, str]], content: str, parallel: bool) -> str:
    """An earlier assistant turn's tool calls as the JSON the model is asked to write."""
    items = [{"name": c["name"], "arguments": _arguments(c["arguments"])} for c in calls]
    out: dict[str, Any] = {"tool_calls": items} if parallel or len(items) != 1 else {"tool_call": items[0]}
    if content:
        out["content"] = content
    return json.dumps(out, ensure_ascii=False)


def _result_text(message: dict[str, Any], names: dict[str, str]) -> str:
    """A ``tool`` message as llama.cpp's generic ``{"tool_response": {"tool", "tool_call_id", "content"}}``;
    the tool's name is the one its call had (OpenAI's tool messages carry only the call's id)."""
    call_id = message.get("tool_call_id", "")
    response: dict[str, Any] = {}
    name = message.get("name") or names.get(call_id)
    if name:
        response["tool"] = name
    if call_id:
        response["tool_call_id"] = call_id
    response["content"] = message["content"]
    return json.dumps({"tool_response": response}, ensure_ascii=False)


def with_system(messages: list[dict[str, str]], text: str) -> list[dict[str, str]]:
    """``text`` appended to the first system message, or one made for it (llama.cpp's ``add_system``)."""
    if messages and messages[0]["role"] == "system":
        first = messages[0]["content"]
        return [{"role": "system", "content": f"{first}\n\n{text}" if first else text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def prompt_messages(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, str]]:
    """The chat a backend renders: plain ``{"role", "content"}`` messages, tool calls and results written
    as JSON text (consecutive results as one user message, for templates that want turns to alternate), and
    with a plan the system message that lists the tools."""
    out: list[dict[str, str]] = []
    names: dict[str, str] = {}
    parallel = plan.parallel if plan else None
    previous = ""
    for message in messages:
        role = message["role"]
        if message.get("tool_calls"):
            calls = message["tool_calls"]
            names.update((c["id"], c["name"]) for c in calls if c["id"])
            text = _calls_text(calls, message["content"], len(calls) > 1 if parallel is None else parallel)
            out.append({"role": "assistant", "content": text})
        elif role == "tool" and previous == "tool":
            out[-1]["content"] += "\n" + _result_text(message, names)
        elif role == "tool":
            out.append({"role": "user", "content": _result_text(message, names)})
        else:
            out.append({"role": role, "content": message["content"]})
        previous = role
    return with_system(out, system_prompt(plan)) if plan else out


# ---- the reply ---------------------------------------------------------------------------------
def _call(value: Any, names: set[str]) -> dict[str, Any] | None:
    """A parsed call as OpenAI's ``{"id", "type", "function": {"name", "arguments"}}``; None when it names
    no offered tool (a backend that ignored the schema)."""
    if not isinstance(value, dict) or value.get("name") not in names or "arguments" not in value:
        return None
    arguments = json.dumps(value["arguments"], ensure_ascii=False, separators=(",", ":"))
    return {"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": value["name"], "arguments": arguments}}


_RESPONSE_START = re.compile(r'\s*\{\s*"response"\s*:\s*"')


def _cut_response(text: str) -> str:
    """The text of a ``{"response": "...`` reply cut short (by ``max_tokens``: the answer the client asked
    for, not the JSON around it, as llama.cpp's parser reads a partial reply); other text as it is."""
    start = _RESPONSE_START.match(text)
    if not start:
        return text
    body = text[start.end():]
    for cut in range(min(len(body), 6) + 1):  # a trailing escape may be incomplete ("\u00")
        try:
            value = json.loads('"' + body[:len(body) - cut] + '"')
        except ValueError:
            continue
        return value if isinstance(value, str) else text
    return text


def parse(text: str, plan: ToolPlan) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool calls) of a reply. Text that is not the JSON asked for (cut by ``max_tokens`` or a
    stop word, or from a backend that ignored the schema) is the content, as it is; but for the text of a
    cut ``response``."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return _cut_response(text), []
    if not isinstance(value, dict) or _depth(value) > 2 * MAX_DEPTH:
        return text, []
    if "tool_calls" in value or "tool_call" in value:
        items = value.get("tool_calls", [value.get("tool_call")])
        names = {f["name"] for f in plan.offered}
        calls = [_call(item, names) for item in items] if isinstance(items, list) else []
        if not calls or any(c is None for c in calls):
            return text, []
        return None, [c for c in calls if c is not None]
    if "response" in value:
        response = value["response"]
        return (response if isinstance(response, str) else json.dumps(response, ensure_ascii=False)), []
    return text, []


def message(text: str, finish: str, plan: ToolPlan) -> tuple[dict[str, Any], str]:
    """The chat completion's ``message`` and ``finish_reason`` for a reply: tool calls (``content`` null,
    finish "tool_calls"; the legacy ``function_call`` and "function_call"), or the content as it came."""
    content, calls = parse(text, plan)
    if not calls:
        return {"role": "assistant", "content": content}, finish
    if plan.legacy:
        return {"role": "assistant", "content": None, "function_call": calls[0]["function"]}, "function_call"
    return {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"


def deltas(text: str, finish: str, plan: ToolPlan) -> tuple[list[dict[str, Any]], str]:
    """A buffered stream's ``delta``s for its whole reply, and its finish reason: one per tool call (with
    its ``index``, id, name and all of its arguments: what OpenAI's streams spread over several), or the
    content in one."""
    reply, finish = message(text, finish, plan)
    if "tool_calls" in reply:
        return [{"tool_calls": [{"index": i, **call}]} for i, call in enumerate(reply["tool_calls"])], finish
    if "function_call" in reply:
        return [{"function_call": reply["function_call"]}], finish
    return ([{"content": reply["content"]}] if reply["content"] else []), finish
