"""The web UI under a flood of streams, with the services as `make up` starts them (fault_harness):
150 log follows open through the UI (they need no sign-in), chat through the UI to the real
inference process still answers within 1 s, and the 151st stream gets a 429 with Retry-After in
the kit's error shape. The trainer has no worker, so the followed job stays queued and its log
stream stays open; inference serves a tiny random checkpoint. Bounded in time."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack

import httpx
import pytest
from fault_harness import FaultStack, poll, tiny_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

STREAMS = 150


async def chat_seconds(http: httpx.AsyncClient, webui: str) -> float:
    body = {"model": "nanochat", "stream": True, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    started = time.monotonic()
    async with http.stream("POST", f"{webui}/api/inference/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
    took = time.monotonic() - started
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[5:]) for line in lines[:-1]]
    finished = [c["choices"][0].get("finish_reason") for c in chunks if c["choices"]]
    assert finished[-1] in ("stop", "length"), lines
    return took


async def flood(webui: str, follow: str) -> dict:
    unlimited = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(timeout=20, limits=unlimited) as http,
        httpx.AsyncClient(timeout=20) as chatter,
        AsyncExitStack() as stack,
    ):
        warm = await chat_seconds(chatter, webui)  # the first generation pays for warm-up

        async def open_one() -> None:
            # The UI answers once the trainer has: a 200 here is a stream open end to end.
            response = await stack.enter_async_context(http.stream("GET", webui + follow))
            assert response.status_code == 200, await response.aread()

        await asyncio.wait_for(asyncio.gather(*(open_one() for _ in range(STREAMS))), 60)
        chat_s = [await chat_seconds(chatter, webui) for _ in range(3)]
        one_more = await http.get(webui + follow)
        return {"warm_s": warm, "chat_s": chat_s, "one_more": one_more}


def test_150_open_log_streams_leave_chat_through_the_ui_answering(tmp_path):
    checkpoint = tiny_checkpoint(tmp_path / "sft")
    extra = {
        "inference": {
            "INFERENCE_MODEL_DIR": str(checkpoint),
            "INFERENCE_DEVICE": "cpu",
            "INFERENCE_CPU_THREADS": "1",
            "INFERENCE_SLOTS": "4",
        }
    }
    stack = FaultStack.create(tmp_path, services=["registry", "trainer-api", "inference"], extra_env=extra)
    try:
        stack.start("webui")
        webui = stack.url("webui")
        poll(lambda: httpx.get(f"{webui}/ready", timeout=5).status_code == 200, 120, "the web UI's services")
        poll(lambda: httpx.get(f"{stack.url('inference')}/ready", timeout=5).status_code == 200, 120, "the model")
        job = stack.trainer.post("/v1/jobs", json={"stage": "make_data", "options": {}, "output_name": "nanochat"})
        assert job.status_code == 202, job.text
        seen = asyncio.run(flood(webui, f"/api/trainer/v1/jobs/{job.json()['id']}/logs?follow=true"))
        print(f"chat through the UI with {STREAMS} streams open: {seen['chat_s']} s (warm-up {seen['warm_s']:.2f} s)")
        assert max(seen["chat_s"]) < 1.0, seen["chat_s"]
        refused = seen["one_more"]
        assert refused.status_code in (429, 503) and int(refused.headers["retry-after"]) > 0, refused.text
        assert set(refused.json()["error"]) == {"message", "type", "param", "code"}
    finally:
        stack.stop()
