"""response_format and tools through the official `openai` SDK against a real server over a
random-weight model (the worst case for a grammar: it wants nothing in particular)."""

import json

import httpx
import openai
import pytest
from conftest import random_model, start_server
from nanochat.checkpoint import save_checkpoint
from pydantic import BaseModel

ASK = [{"role": "user", "content": "Describe a person as JSON."}]


class Person(BaseModel):
    name: str
    age: int
    tags: list[str]
    ok: bool


class Lookup(BaseModel):
    city: str
    days: int


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "the forecast",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "clock",
        "strict": True,
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, tok):
    folder = save_checkpoint(
        tmp_path_factory.mktemp("long") / "ckpt", random_model(tok, 5, sequence_len=1024), tok, meta={"stage": "sft"}
    )
    s = start_server(model_dir=folder, slots=16, max_waiting=64)
    s.wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_sdk_parse_returns_a_valid_object_for_all_50_samples(client):
    parsed = []
    for seed in range(5):
        result = client.beta.chat.completions.parse(
            model=None, messages=ASK, response_format=Person, n=10, max_tokens=96, seed=seed
        )
        for choice in result.choices:
            assert choice.finish_reason == "stop", choice.message.content
            assert isinstance(choice.message.parsed, Person)
            parsed.append(choice.message.parsed)
    assert len(parsed) == 50
    assert len({p.model_dump_json() for p in parsed}) > 40  # sampled, not one forced answer


def test_json_object_streamed_and_not(client):
    kw = dict(model="nanochat", messages=ASK, max_tokens=64, response_format={"type": "json_object"}, n=4)
    whole = client.chat.completions.create(**kw, seed=1)
    for choice in whole.choices:
        assert choice.finish_reason == "stop"
        assert isinstance(json.loads(choice.message.content), dict)
    texts = {}
    finishes = {}
    for chunk in client.chat.completions.create(**kw, seed=2, stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert finishes == {i: "stop" for i in range(4)}
    assert all(isinstance(json.loads(t), dict) for t in texts.values())


def test_same_seed_same_json_whether_streamed_or_not(client):
    kw = dict(messages=ASK, max_tokens=64, response_format={"type": "json_object"}, seed=7)
    whole = client.chat.completions.create(model="nanochat", **kw).choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="nanochat", stream=True, **kw)
        if c.choices
    )
    assert streamed == whole


@pytest.mark.parametrize(("schema", "needle"), [({"type": "strin"}, "strin"), ({"$ref": "#/$defs/Missing"}, "Missing")])
def test_an_uncompilable_schema_is_a_400_naming_the_problem(client, schema, needle):
    fmt = {"type": "json_schema", "json_schema": {"name": "broken", "schema": schema, "strict": True}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nanochat", messages=ASK, response_format=fmt)
    assert needle in e.value.body["message"] and e.value.body["param"] == "response_format"


def valid_call(call) -> bool:
    arguments = json.loads(call.function.arguments)
    if call.function.name == "weather":
        return set(arguments) == {"city", "days"} and isinstance(arguments["days"], int)
    return call.function.name == "clock" and arguments == {}


def test_required_tool_call_whole_and_streamed(client):
    kw = dict(
        model="nanochat",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        max_tokens=80,
        n=3,
        parallel_tool_calls=False,
    )
    whole = client.chat.completions.create(**kw, seed=3)
    for choice in whole.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        arguments = json.loads(call.function.arguments)
        if call.function.name == "weather":
            assert set(arguments) == {"city", "days"} and isinstance(arguments["days"], int)
        else:
            assert call.function.name == "clock" and isinstance(arguments, dict)
    with client.beta.chat.completions.stream(**{**kw, "n": 1}, seed=4) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.id.startswith("call_") and call.function.name in ("weather", "clock")
    assert isinstance(json.loads(call.function.arguments), dict)


def test_parallel_tool_calls_give_one_or_more_calls_whole_and_streamed(client):
    # The random-weight model picks between another call and the end after each call.
    kw = dict(model="nanochat", messages=ASK, tools=[TIME], tool_choice="required", max_tokens=120)
    whole = client.chat.completions.create(**kw, n=16, seed=6)  # parallel_tool_calls: OpenAI's default, true
    counts = []
    for choice in whole.choices:
        assert choice.finish_reason == "tool_calls" and all(valid_call(c) for c in choice.message.tool_calls)
        assert len({c.id for c in choice.message.tool_calls}) == len(choice.message.tool_calls)
        counts.append(len(choice.message.tool_calls))
    assert min(counts) >= 1 and max(counts) > 1, counts
    for seed in range(7, 20):
        with client.beta.chat.completions.stream(**kw, seed=seed) as stream:
            calls = stream.get_final_completion().choices[0].message.tool_calls
        if len(calls) > 1:  # the SDK assembled each call from its own deltas (index 0, 1, ...)
            assert all(valid_call(c) for c in calls)
            break
    else:
        raise AssertionError("no streamed sample made more than one call")


def test_named_function_is_constrained_to_its_schema_and_parsed_by_the_sdk(client):
    tool = openai.pydantic_function_tool(Lookup, name="lookup")
    choice = {"type": "function", "function": {"name": "lookup"}}
    for stream in (False, True):
        kw = dict(model="nanochat", messages=ASK, tools=[tool, TIME], tool_choice=choice, max_tokens=80, seed=5)
        if stream:
            with client.beta.chat.completions.stream(**kw) as s:
                result = s.get_final_completion()
        else:
            result = client.beta.chat.completions.parse(**kw)
        (call,) = result.choices[0].message.tool_calls
        assert call.function.name == "lookup"
        assert isinstance(call.function.parsed_arguments, Lookup)


def test_tool_results_render_back_into_the_prompt(client):
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Oslo", "days": 2}'},
    }
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]}]
    with_result = [*turn, {"role": "tool", "tool_call_id": "call_1", "content": "rain, 4 C"}]
    kw = dict(model="nanochat", tools=[WEATHER], max_tokens=4, temperature=0)
    short = client.chat.completions.create(messages=turn + [{"role": "user", "content": "ok"}], **kw)
    long = client.chat.completions.create(messages=with_result, **kw)
    assert long.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # The call and its result are both in the prompt, inside the assistant's open turn.
    assert long.usage.prompt_tokens > short.usage.prompt_tokens - 10
    listed = client.chat.completions.create(messages=ASK, **kw).usage.prompt_tokens
    bare = client.chat.completions.create(messages=ASK, model="nanochat", max_tokens=4).usage.prompt_tokens
    assert listed > bare + 20  # the tools are listed ahead of the user's message


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": [WEATHER, WEATHER]}, "tools"),
        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}]}, "tools"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "strin"}}}],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
def test_bad_tool_requests_are_400s(client, extra, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nanochat", messages=ASK, max_tokens=4, **extra)
    assert (e.value.body["param"] or "").startswith(param.split(".")[0]), e.value.body


def test_tool_results_render_in_the_order_of_the_calls_they_answer(server):
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": "clock", "arguments": "{}"}} for i in (1, 2)]
    turn = [*ASK, {"role": "assistant", "content": None, "tool_calls": calls}]

    def tokens(*results: tuple[str | None, str]) -> list[int] | httpx.Response:
        tool = [{"role": "tool", "tool_call_id": i, "content": text} for i, text in results]
        r = httpx.post(f"{server.url}/tokenize", json={"messages": turn + tool, "tools": [TIME]}, timeout=30)
        return r.json()["tokens"] if r.status_code == 200 else r

    in_order = tokens(("call_1", "one"), ("call_2", "two"))
    assert tokens(("call_2", "two"), ("call_1", "one")) == in_order
    assert tokens((None, "two"), (None, "one")) != in_order  # without ids they stay as sent
    bad = tokens(("call_1", "one"), ("call_9", "two"))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages.3.tool_call_id"


def test_auto_reads_back_only_real_calls_and_evaluates_the_calculator(checkpoints):
    s = start_server(model_dir=checkpoints["scripted"], slots=4)
    try:
        s.wait_ready()
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0)
        kw = dict(model="nanochat", messages=ASK, temperature=0, max_tokens=40)
        plain = client.chat.completions.create(**kw).choices[0]
        tiny = {"type": "function", "function": {"name": "f"}}  # the scripted model's context is 256 tokens
        auto = client.chat.completions.create(**kw, tools=[tiny]).choices[0]
    finally:
        s.stop()
    parts = [(p["type"], p["text"]) for p in auto.message.model_extra["nanochat_parts"]]
    # The scripted model's calculator call `7*3` is no call of `f`: the calculator evaluates it and
    # the turn goes on, as without tools.
    assert ("python", "7*3") in parts and ("python_output", "21") in parts
    assert parts == [(p["type"], p["text"]) for p in plain.message.model_extra["nanochat_parts"]]
    assert auto.finish_reason == plain.finish_reason and auto.message.tool_calls is None


def test_a_python_part_naming_a_listed_function_becomes_a_tool_call():
    from inference import structured

    plan = structured.plan(None, [structured.Tool.model_validate(WEATHER)], None)
    call = '{"name": "weather", "arguments": {"city": "Oslo", "days": 2}}'
    content, calls, reason = structured.answer([("text", "Let me look. "), ("python", call)], plan, "stop")
    assert content == "Let me look. " and reason == "tool_calls"
    assert calls[0].function.name == "weather" and json.loads(calls[0].function.arguments) == {
        "city": "Oslo",
        "days": 2,
    }
    for text in ["7*3", '{"name": "other", "arguments": {}}', '{"name": "weather", "arguments": 3}']:
        assert structured.answer([("python", text)], plan, "stop") == ("", None, "stop")
    deltas = structured.ToolDeltas(plan)
    head, body = deltas.deltas(0, "python", call)
    assert head["tool_calls"][0]["function"] == {"name": "weather", "arguments": ""}
    assert json.loads(body["tool_calls"][0]["function"]["arguments"])["city"] == "Oslo"
    assert deltas.finish_reason(0, "stop") == "tool_calls" and deltas.finish_reason(1, "stop") == "stop"


def test_a_tool_call_whose_arguments_are_not_json_is_a_400(client):
    call = {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{city: Oslo"}}
    messages = [*ASK, {"role": "assistant", "tool_calls": [call]}, {"role": "tool", "content": "rain"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nanochat", messages=messages, tools=[WEATHER], max_tokens=4)
    assert e.value.body["param"] == "messages.1.tool_calls.0.function.arguments"
