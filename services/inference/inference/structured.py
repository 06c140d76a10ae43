"""Structured output and function tools on chat completions (docs/tools.md).

A request's `response_format`, `tools`, `tool_choice` and `parallel_tool_calls` become a `Plan`:
which functions the prompt lists (and which tool-call parts are read back as calls), the grammar
the samples follow (`nanochat.grammar`), and which calls end a sample's turn in the engine.
`response_format` `json_object` / `json_schema` and `tool_choice` `required` / a named function
are constrained decoding; `auto` lets the model choose between text and a call: a python block
calling a listed function with a JSON object of arguments is a call (the engine ends the turn
there), any other block is the calculator's, evaluated as without tools; `none` lists no tools at
all. `parallel_tool_calls` (OpenAI's default: true) lets a call follow a call in the same turn,
constrained or not; false means one call at most. A `json_schema` is followed whether or not it
says `strict` (an answer always adheres).

What the model wrote comes back as OpenAI's `tool_calls` (`call_...` ids, the function's name,
its arguments as a JSON string, finish_reason "tool_calls"): whole in a message, or in a stream
as one delta with the id and name and one with the arguments, which the SDKs assemble.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from nanochat.grammar import GrammarError, compile_spec, tool_call_grammar
from nanochat.tokenizer import Tokenizer, parse_tool_call, tool_call_text
from pydantic import BaseModel, ConfigDict, Field, model_validator
from service_kit.errors import APIError

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function and schema names


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class JsonSchemaFormat(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("response_format.json_schema is required with type json_schema, and only then")
        return self


class FunctionDef(Strict):
    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # parameters are always followed when a call is constrained


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


@dataclass(frozen=True)
class Plan:
    functions: list[FunctionDef] = field(default_factory=list)  # listed in the prompt, read back as calls
    grammar: str | dict[str, Any] | None = None  # what nanochat.grammar.compile_spec takes
    grammar_param: str | None = None  # the request field a grammar error is blamed on
    parallel: bool = True  # a call may follow a call in one turn
    engine_tools: tuple[str, ...] = ()  # the functions whose unconstrained calls end a turn (auto)

    @property
    def calls(self) -> bool:
        return bool(self.functions)


def plan(
    response_format: ResponseFormat | None,
    tools: list[Tool] | None,
    tool_choice: ToolChoice | None,
    parallel_tool_calls: bool | None = None,
) -> Plan:
    """What the request asks for; a 400 for a combination that cannot be met."""
    parallel = parallel_tool_calls is not False
    if tool_choice is not None and not tools:
        raise APIError(400, "tool_choice needs tools", param="tool_choice", code="invalid_value")
    functions = [t.function for t in tools or []]
    names = [f.name for f in functions]
    if len(set(names)) != len(names):
        raise APIError(400, "tools must have distinct function names", param="tools", code="invalid_value")
    choice = tool_choice or ("auto" if tools else "none")
    if choice == "none":
        functions = []
    json_format = response_format is not None and response_format.type != "text"
    forced = choice == "required" or isinstance(choice, NamedToolChoice)
    if json_format and forced:
        raise APIError(
            400,
            "response_format asks for a JSON answer but tool_choice for a tool call; a turn can be only one",
            param="tool_choice",
            code="invalid_value",
        )
    if json_format:
        fmt = response_format.json_schema
        schema = "json_object" if fmt is None or fmt.json_schema is None else fmt.json_schema
        return Plan(functions, schema, "response_format", parallel)
    if forced:
        chosen = functions
        if isinstance(choice, NamedToolChoice):
            chosen = [f for f in functions if f.name == choice.function.name]
            if not chosen:
                raise APIError(
                    400,
                    f"tool_choice names {choice.function.name!r}, which is not among the tools ({', '.join(names)})",
                    param="tool_choice",
                    code="invalid_value",
                )
        return Plan(functions, tool_call_grammar([(f.name, f.parameters) for f in chosen], parallel), "tools", parallel)
    return Plan(functions, None, "tools", parallel, tuple(f.name for f in functions))


def grammar_spec(p: Plan, tokenizer: Tokenizer, budget: int) -> str | None:
    """The compiled spec for SamplingParams.grammar; a 400 naming the problem when it cannot compile.
    Under `auto` nothing constrains the call, but parameters no grammar could follow are refused
    all the same, so a request is not valid or not by which tool_choice it names."""
    try:
        if p.grammar is None:
            if p.functions:
                compile_spec(tool_call_grammar([(f.name, f.parameters) for f in p.functions]), tokenizer)
            return None
        return compile_spec(p.grammar, tokenizer, budget=max(1, budget))
    except GrammarError as e:
        raise APIError(
            400, f"the schema cannot be compiled: {e}", param=p.grammar_param, code="invalid_schema"
        ) from None


def conversation(messages: list[Any], tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The request's messages (schemas.ChatMessage) and listed tools as the tokenizer's renderer
    takes them. An assistant message's `nanochat_parts` already hold its calls as python parts."""
    out = []
    for i in render_order(messages):
        m = messages[i]
        if m.role == "assistant" and m.tool_calls and not m.nanochat_parts:
            content = "" if m.content is None else m.rendered_content()
            out.append({"role": "assistant", "content": call_parts(content, m.tool_calls, i)})
        else:
            out.append({"role": m.role, "content": m.rendered_content()})
    return {"messages": out, "tools": tools}


def render_order(messages: list[Any]) -> list[int]:
    """The messages' indices in the order they are rendered: the tool results right after an
    assistant message's calls go in the order of the calls they answer (by `tool_call_id`, when
    every one of them names one), as the model wrote the calls. An id that answers none of that
    message's calls is a 400."""
    order, i = [], 0
    while i < len(messages):
        asked, i = messages[i], i + 1
        order.append(i - 1)
        if asked.role != "assistant" or not asked.tool_calls:
            continue
        ids = [call.id for call in asked.tool_calls]
        run = []
        while i < len(messages) and messages[i].role == "tool":
            run.append(i)
            i += 1
        for j in run:
            answered = messages[j].tool_call_id
            if answered is not None and answered not in ids:
                raise APIError(
                    400,
                    f"tool_call_id {answered!r} answers none of the calls of message {order[-1]} ({', '.join(ids)})",
                    param=f"messages.{j}.tool_call_id",
                    code="invalid_value",
                )
        if all(messages[j].tool_call_id is not None for j in run):
            run.sort(key=lambda j: ids.index(messages[j].tool_call_id))
        order.extend(run)
    return order


def call_parts(content: str | list[dict[str, str]], tool_calls: list[ToolCall], index: int) -> list[dict[str, str]]:
    """An assistant message's parts: its text, then each call as a python part."""
    parts = [{"type": "text", "text": content}] if isinstance(content, str) and content else list(content or [])
    for j, call in enumerate(tool_calls):
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            raise APIError(
                400,
                f"tool call arguments must be a JSON string: {call.function.arguments!r}",
                param=f"messages.{index}.tool_calls.{j}.function.arguments",
                code="invalid_value",
            ) from None
        parts.append({"type": "python", "text": tool_call_text(call.function.name, arguments)})
    return parts


def tools_for_prompt(p: Plan) -> list[dict[str, Any]] | None:
    return [f.model_dump(include={"name", "description", "parameters"}) for f in p.functions] or None


def parse_call(text: str, p: Plan) -> FunctionCall | None:
    """A python part as a call of one of the plan's functions, or None (then it stays a part)."""
    call = parse_tool_call(text, {f.name for f in p.functions}) if p.calls else None
    if call is None:
        return None
    return FunctionCall(name=call[0], arguments=json.dumps(call[1], ensure_ascii=False))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def answer(
    parts: list[tuple[str, str]], p: Plan, finish_reason: str | None
) -> tuple[str | None, list[ToolCall] | None, str | None]:
    """(content, tool_calls, finish_reason) of a whole choice from its merged parts."""
    found = (parse_call(text, p) for kind, text in parts if kind == "python")
    calls = [ToolCall(id=new_call_id(), function=c) for c in found if c is not None]
    content = "".join(text for kind, text in parts if kind == "text")
    if calls:
        return content or None, calls, "tool_calls"
    return content, None, finish_reason


class ToolDeltas:
    """A stream's tool calls, per choice: the deltas a call part becomes, and the finish reason."""

    def __init__(self, p: Plan):
        self.plan = p
        self.count: dict[int, int] = {}

    def deltas(self, choice: int, kind: str, text: str) -> list[dict[str, Any]] | None:
        call = parse_call(text, self.plan) if kind == "python" else None
        if call is None:
            return None
        index = self.count.get(choice, 0)
        self.count[choice] = index + 1
        head = {
            "index": index,
            "id": new_call_id(),
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        return [{"tool_calls": [head]}, {"tool_calls": [{"index": index, "function": {"arguments": call.arguments}}]}]

    def finish_reason(self, choice: int, reason: str | None) -> str | None:
        return "tool_calls" if reason is not None and self.count.get(choice) else reason
