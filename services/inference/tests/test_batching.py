"""Continuous batching behind the API: batch-independent output, disconnects, a full queue."""

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
from conftest import scrape, start_server, wait_for
from starlette.requests import ClientDisconnect


def test_greedy_alone_equals_greedy_in_a_batch_of_16_mixed_requests(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    targets = [[{"role": "user", "content": q}] for q in ("What is 7*3?", "The lazy dog " * 20, "héllo")]

    def greedy(messages):
        return (
            client.chat.completions.create(model="nanochat", messages=messages, max_tokens=20, temperature=0)
            .choices[0]
            .message.content
        )

    alone = [greedy(m) for m in targets]
    assert len(set(alone)) == len(alone), "the model must answer different prompts differently"

    def mixed(i):
        if i < len(targets):
            return greedy(targets[i])
        stream = client.chat.completions.create(
            model="nanochat",
            messages=[{"role": "user", "content": "Numbers like " * (i % 4 + 1)}],
            max_tokens=4 + 3 * i,
            temperature=0.9,
            extra_body={"top_k": 40},
            seed=i,
            n=1 + i % 2,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(mixed, range(16)))
    assert results[: len(targets)] == alone


def test_disconnect_frees_the_cache_at_once(checkpoints):
    s = start_server(model_dir=checkpoints["a"], slots=4, max_len=2048)
    try:
        s.wait_ready()
        scheduler = s.manager.current.scheduler
        # Greedy: this model's greedy reply runs to max_tokens; a sampled one meets
        # <|assistant_end|> after a few hundred tokens and could end before the disconnect.
        body = {
            "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": 2000,
            "temperature": 0.0,
            "stream": True,
        }
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            while sum(1 for line in [next(lines)] if line.startswith("data: ")) == 0:
                pass
            for _ in range(5):
                next(lines)
            assert scheduler.stats().used_slots == 1
            during = scrape(s.url)
            assert during["nanochat:num_requests_running"] == 1 and during["nanochat:kv_cache_usage_perc"] > 0
        wait_for(lambda: scheduler.stats().used_slots == 0, what="the slot to be freed")
        assert scheduler.stats().kv_blocks_used == 0, "the disconnected request still holds KV blocks"
        after = scrape(s.url)
        assert after["nanochat:num_requests_running"] == 0 and after["nanochat:kv_cache_usage_perc"] == 0
        metrics = httpx.get(f"{s.url}/metrics").text
        generated = [line for line in metrics.splitlines() if line.startswith("nanochat:generation_tokens_total")]
        assert float(generated[0].split()[-1]) < 2000, "the request ran on instead of being cancelled"
        assert 'outcome="disconnected"' in metrics
    finally:
        s.stop()


def test_client_gone_before_the_first_byte_frees_the_request(server):
    """The client's socket is gone when the response starts: no body byte is ever sent."""
    scheduler, manager = server.manager.current.scheduler, server.manager
    body = json.dumps(
        {
            "messages": [{"role": "user", "content": "Tell me everything."}],
            "max_tokens": 2000,
            "temperature": 0.0,
            "stream": True,
        }
    ).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "",
        "query_string": b"",
        "server": ("127.0.0.1", 80),
        "client": ("127.0.0.1", 5000),
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    }
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    started = []

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.sleep(3600)

    async def send(message):
        if message["type"] == "http.response.start":
            stats = scheduler.stats()  # one snapshot: the request moves from waiting to a slot meanwhile
            started.append(stats.used_slots + stats.waiting)
            raise OSError("the client has gone")

    with pytest.raises((OSError, ClientDisconnect)):
        asyncio.run(server.app(scope, receive, send))
    assert started == [1], "the request was queued before the response started"
    wait_for(lambda: scheduler.stats().used_slots == 0 and scheduler.stats().waiting == 0, what="the slot to be freed")
    assert manager.current.active == 0


def test_full_queue_is_429_with_retry_after(checkpoints):
    s = start_server(model_dir=checkpoints["a"], slots=1, max_waiting=1, max_len=2048)
    try:
        s.wait_ready()
        scheduler = s.manager.current.scheduler
        # Greedy, so neither request ends on <|assistant_end|> while the queue must stay full.
        body = {
            "messages": [{"role": "user", "content": "Go on."}],
            "max_tokens": 2000,
            "temperature": 0.0,
            "stream": True,
        }
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{s.url}/v1/chat/completions", json=body) as running:
                wait_for(lambda: scheduler.stats().running == 1, what="the first request to run")
                with http.stream("POST", f"{s.url}/v1/chat/completions", json=body) as waiting:
                    assert waiting.status_code == 200
                    wait_for(lambda: scheduler.stats().waiting == 1, what="the second request to wait")
                    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)
                    with pytest.raises(openai.RateLimitError) as e:
                        client.chat.completions.create(model="nanochat", messages=body["messages"])
                    assert e.value.response.headers["retry-after"] == "1"
                    assert e.value.code == "queue_full"
                assert running.status_code == 200 and json.loads(next(running.iter_lines())[6:])["choices"]
        wait_for(
            lambda: scheduler.stats().used_slots == 0 and scheduler.stats().waiting == 0,
            what="both requests to be cancelled",
        )
    finally:
        s.stop()


def test_the_kv_pool_size_is_a_setting_and_bounds_what_a_request_may_need(checkpoints):
    # 9 blocks with the null block: 8 of 16 tokens, one sequence of max_len 128. A prompt of 97 to
    # 112 tokens takes 7; with n=4 its 3 more samples need a block each for their own last block.
    s = start_server(model_dir=checkpoints["a"], slots=4, max_len=128, kv_blocks=9)
    try:
        s.wait_ready()
        assert s.manager.current.scheduler.shape.kv_blocks == 8
        prompt = ""
        while (count := httpx.post(f"{s.url}/tokenize", json={"prompt": prompt}).json()["count"]) <= 96:
            prompt += "on and "
        assert count <= 112
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="nanochat", prompt=prompt, max_tokens=4, n=4)
        assert "KV pool's 8 blocks of 16" in e.value.message
        fits = client.completions.create(model="nanochat", prompt=prompt, max_tokens=4, n=2, temperature=0)
        assert [c.index for c in fits.choices] == [0, 1]
    finally:
        s.stop()


def test_a_prefix_cache_hit_inside_a_mixed_batch_gives_the_cold_greedy_output(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    history = [
        {"role": "user", "content": "Unicode too: héllo wörld, naïve café. " * 4},
        {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog. " * 2},
        {"role": "user", "content": "What is 7*3? It is 21."},
    ]

    def greedy():
        reply = client.chat.completions.create(model="nanochat", messages=history, max_tokens=12, temperature=0)
        return reply.choices[0].message.content

    hits = scrape(server.url)["nanochat:prefix_cache_hits_total"]
    cold = greedy()

    def mixed(i):
        if i == 0:
            return greedy()
        stream = client.chat.completions.create(
            model="nanochat",
            messages=history[:2] + [{"role": "user", "content": "Numbers like " * i}],
            max_tokens=5 + i,
            temperature=0.9,
            seed=i,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(mixed, range(8)))
    assert results[0] == cold
    assert scrape(server.url)["nanochat:prefix_cache_hits_total"] > hits
