"""The OpenAI-compatible API through the official `openai` SDK and raw HTTP, on tiny checkpoints."""

import json
import logging
import threading
import time

import httpx
import openai
import pytest
from conftest import SCRIPT_WORDS, scrape, start_server, wait_for
from fastapi.testclient import TestClient
from inference.api import create_app
from inference.settings import Settings

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7*3?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def sse_events(response: httpx.Response) -> list:
    """The data payloads of an SSE response, JSON-decoded except the final [DONE]."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_chat_stream_equals_non_stream_and_has_openai_framing(client):
    kw = dict(model="nanochat", messages=CHAT, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert (
        full.usage.completion_tokens > 0
        and full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    )

    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [choice.finish_reason]
    assert not chunks[-1].choices and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_both_path_spellings_and_raw_sse(server):
    body = {
        "model": "nanochat",
        "messages": CHAT,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "store": False,  # a field OpenAI documents as ignorable; unknown ones are 400s (test_openai_breadth)
        "top_k": 0,
    }
    contents = []
    for path in ("/v1/chat/completions", "/chat/completions"):
        with httpx.stream("POST", server.url + path, json=body, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events(r)
        assert events[-1] == "[DONE]"
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
        contents.append("".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]))
    assert contents[0] == contents[1]


def test_completions_and_models(client, server):
    out = client.completions.create(model="nanochat", prompt="The quick brown", max_tokens=6, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.prompt_tokens > 1
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="nanochat", prompt="The quick brown", max_tokens=6, temperature=0, stream=True
        )
    )
    assert streamed == out.choices[0].text
    r = httpx.post(f"{server.url}/completions", json={"prompt": ["a", "b"], "max_tokens": 3, "n": 2, "seed": 1})
    assert sorted(c["index"] for c in r.json()["choices"]) == [0, 1, 2, 3]
    models = client.models.list().data
    assert [m.id for m in models] == ["nanochat"]
    card = models[0].model_dump()
    assert card["stage"] == "sft" and card["context_length"] == 256


def test_seed_n_and_stop(client):
    kw = dict(model="nanochat", messages=CHAT, max_tokens=16, temperature=1.0, top_p=0.95, seed=7)
    one = client.chat.completions.create(**kw, n=2)
    again = client.chat.completions.create(**kw, n=2)
    assert [c.message.content for c in one.choices] == [c.message.content for c in again.choices]
    assert one.choices[0].message.content != one.choices[1].message.content

    greedy = client.chat.completions.create(model="nanochat", messages=CHAT, max_tokens=24, temperature=0)
    text = greedy.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    cut = client.chat.completions.create(model="nanochat", messages=CHAT, max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == text[: text.index(stop)]


def test_message_content_as_text_parts_and_assistant_history(client, tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "7*3?"}]}]
    a = client.chat.completions.create(model="nanochat", messages=parts, max_tokens=5, temperature=0)
    b = client.chat.completions.create(
        model="nanochat", messages=[{"role": "user", "content": "What is 7*3?"}], max_tokens=5, temperature=0
    )
    assert a.choices[0].message.content == b.choices[0].message.content

    tool_turn = [
        {"type": "text", "text": "Let me see"},
        {"type": "python", "text": "7*3"},
        {"type": "python_output", "text": "21"},
        {"type": "text", "text": "It is 21."},
    ]
    history = [
        {"role": "user", "content": "What is 7*3?"},
        {"role": "assistant", "content": "Let me see It is 21.", "nanochat_parts": tool_turn},
        {"role": "user", "content": "Thanks"},
    ]
    r = client.chat.completions.create(model="nanochat", messages=history, max_tokens=2, temperature=0)
    expected = tok.render_for_completion(
        {"messages": [history[0], {"role": "assistant", "content": tool_turn}, history[2]]}
    )
    assert r.usage.prompt_tokens == len(expected)


@pytest.fixture(scope="module")
def scripted(checkpoints):
    s = start_server(model_dir=checkpoints["scripted"], slots=4)
    s.wait_ready()
    yield s
    s.stop()


def test_tool_calls_stream_as_nanochat_tool_and_parts(scripted):
    body = {"messages": [{"role": "user", "content": "What is 7*3?"}], "max_tokens": 40, "temperature": 0}
    r = httpx.post(f"{scripted.url}/v1/chat/completions", json=body, timeout=60).json()
    message = r["choices"][0]["message"]
    words = SCRIPT_WORDS
    assert message["nanochat_parts"] == [
        {"type": "text", "text": "".join(words[:4])},
        {"type": "python", "text": "7*3"},
        {"type": "python_output", "text": "21"},
        {"type": "text", "text": "".join(words[4:])},
    ]
    assert message["content"] == "".join(words) and r["choices"][0]["finish_reason"] == "stop"

    with httpx.stream("POST", f"{scripted.url}/v1/chat/completions", json={**body, "stream": True}, timeout=60) as s:
        deltas = [e["choices"][0]["delta"] for e in sse_events(s)[:-1]]
    tools = [d["nanochat_tool"] for d in deltas if "nanochat_tool" in d]
    assert tools == [{"type": "python", "text": "7*3"}, {"type": "python_output", "text": "21"}]
    assert "".join(d.get("content", "") for d in deltas) == message["content"]


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({"messages": CHAT, "max_tokens": -1}, "max_tokens"),
        ({"messages": CHAT, "temperature": 2.5}, "temperature"),
        ({"messages": CHAT, "top_p": 0}, "top_p"),
        ({"messages": CHAT, "top_k": -2}, "top_k"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, "user"),
        ({"messages": CHAT, "n": 0}, "n"),
        ({"messages": CHAT, "stop_token_ids": [10**9]}, "stop_token_ids"),
    ],
)
def test_bad_values_are_400_openai_errors(server, body, fragment):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert fragment in error["message"] and error["type"] == "invalid_request_error"


def test_request_errors(server, client):
    r = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b"{not json",
        timeout=30,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"

    long = [{"role": "user", "content": "The quick brown fox " * 200}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="nanochat", messages=long, stream=True)
    assert e.value.code == "context_length_exceeded"
    assert "256" in e.value.message and "prompt has" in e.value.message

    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=CHAT)

    big = {"messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=big, timeout=30).status_code == 413

    def chunked():
        for _ in range(3):
            yield b" " * (600 * 1024)

    r = httpx.post(
        f"{server.url}/v1/chat/completions", content=chunked(), timeout=30, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_token_and_no_model(checkpoints):
    guarded = start_server(model_dir=checkpoints["a"], api_token="s3cret", slots=2)
    empty = start_server()
    try:
        guarded.wait_ready()
        bad = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.chat.completions.create(model="nanochat", messages=CHAT)
        good = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="nanochat", messages=CHAT, max_tokens=2).choices
        assert httpx.get(f"{guarded.url}/health").status_code == 200

        r = httpx.post(f"{empty.url}/v1/chat/completions", json={"messages": CHAT}, timeout=30)
        assert r.status_code == 503 and "no model" in r.json()["error"]["message"]
        assert httpx.get(f"{empty.url}/ready").status_code == 503
        assert httpx.get(f"{empty.url}/health").status_code == 200
    finally:
        guarded.stop()
        empty.stop()


def test_metrics_under_vllm_names_move(server, client):
    before = scrape(server.url)
    client.chat.completions.create(model="nanochat", messages=CHAT, max_tokens=4, temperature=0)
    after = scrape(server.url)
    for name in (
        "nanochat:time_to_first_token_seconds_count",
        "nanochat:inter_token_latency_seconds_count",
        "nanochat:e2e_request_latency_seconds_count",
        "nanochat:prompt_tokens_total",
        "nanochat:generation_tokens_total",
    ):
        assert after[name] > before.get(name, 0), name
    assert after["nanochat:generation_tokens_total"] - before.get("nanochat:generation_tokens_total", 0) == 4
    for name in (
        "nanochat:num_requests_waiting",
        "nanochat:prefix_cache_queries_total",
        "nanochat:prefix_cache_hits_total",
    ):
        assert name in after


def test_request_id_in_header_and_json_logs(server, caplog):
    from service_kit.logs import JsonFormatter

    caplog.set_level(logging.INFO, logger="inference.runs")
    body = {"messages": CHAT, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as r:
        events = sse_events(r)
        rid = r.headers["x-request-id"]
    assert events[0]["id"] == rid
    plain = httpx.post(f"{server.url}/v1/completions", json={"prompt": "The quick", "max_tokens": 3}, timeout=60)
    assert plain.headers["x-request-id"] == plain.json()["id"]

    def logged() -> dict:
        lines = [json.loads(JsonFormatter().format(rec)) for rec in caplog.records if hasattr(rec, "request_id")]
        return {line["request_id"]: line for line in lines}

    # A stream's end is logged after its last byte went out, so the client may read it first.
    wait_for(lambda: {rid, plain.json()["id"]} <= set(logged()), what="both requests' log lines")
    assert "ok" in logged()[rid]["message"]


def test_401_404_and_400_share_the_error_shape():
    # OpenAI's dialect: a request that fails validation is a 400 here (422 on the other services).
    shape = {"message", "type", "param", "code"}
    with TestClient(create_app(Settings(api_token="s3cret"))) as c:
        refused = c.post("/v1/chat/completions", json={"messages": CHAT})
        unknown_route = c.get("/v1/no-such-route", headers={"Authorization": "Bearer s3cret"})
        invalid = c.post(
            "/v1/chat/completions", json={"messages": CHAT, "n": 0}, headers={"Authorization": "Bearer s3cret"}
        )
    for r, status in [(refused, 401), (unknown_route, 404), (invalid, 400)]:
        assert r.status_code == status and set(r.json()) == {"error"} and set(r.json()["error"]) == shape, r.text
    assert refused.json()["error"]["type"] == "authentication_error"
    assert unknown_route.json()["error"]["code"] == "not_found"
    assert invalid.json()["error"]["param"] == "n" and invalid.json()["error"]["code"] == "invalid_value"


def test_a_completions_prompt_list_is_capped(server):
    limit = server.app.state.settings.max_prompts
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": ["a"] * (limit + 1), "max_tokens": 1}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt" and str(limit) in r.json()["error"]["message"]
    slots = server.manager.current.scheduler.slots
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": ["a", "b"], "n": slots, "max_tokens": 1}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert server.manager.current.scheduler.stats().waiting == 0


def test_tokenizing_a_large_request_does_not_stall_the_event_loop(checkpoints):
    s = start_server(model_dir=checkpoints["a"], slots=2, max_body_bytes=64 * 1024 * 1024, max_prompts=64)
    try:
        s.wait_ready()
        # 48 prompts of 1 MB: seconds of tokenizing, then a 400 as each is longer than the context.
        body = json.dumps({"prompt": ["The quick brown fox héllo " * 40_000] * 48, "max_tokens": 1})
        done, pings, answers = threading.Event(), [], []

        def post():
            try:
                headers = {"content-type": "application/json"}
                answers.append(httpx.post(f"{s.url}/v1/completions", content=body, headers=headers, timeout=120))
            finally:
                done.set()

        poster = threading.Thread(target=post)
        started = time.monotonic()
        poster.start()
        time.sleep(0.3)  # the body is read and parsed on the loop first
        with httpx.Client(timeout=30) as http:
            while not done.is_set():
                t = time.monotonic()
                http.get(f"{s.url}/health")
                pings.append(time.monotonic() - t)
                time.sleep(0.02)
        poster.join()
        assert answers[0].status_code == 400 and answers[0].json()["error"]["param"] == "prompt"
        assert time.monotonic() - started > 1.5, "the request must tokenize for a while for this test to mean much"
        assert max(pings) < 1.0, f"/health waited {max(pings):.2f} s behind the tokenizer"
    finally:
        s.stop()
