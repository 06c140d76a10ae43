"""Streams held open through the UI (a log follow needs no sign-in) cannot freeze it: with 150
log streams open, chat through the UI still answers within 1 s, and the 151st stream gets a 429
with Retry-After in the kit's error shape. Real processes: the web UI server in front of the
fake upstream, which holds every log follow open, and once in front of the real trainer API."""

import asyncio
import json
import os
import subprocess
import sys
import time
from contextlib import AsyncExitStack

import httpx
import pytest
from conftest import CHAT_TOKEN, OUTPUT, Proc, free_port, poll, start_webui, wait_healthy

pytestmark = pytest.mark.slow

STREAMS = 150
FOLLOW = "/api/trainer/v1/jobs/job-1/logs?follow=true"


async def open_stream(http: httpx.AsyncClient, stack: AsyncExitStack, url: str, first_line: bool = True) -> None:
    response = await stack.enter_async_context(http.stream("GET", url))
    assert response.status_code == 200, await response.aread()
    if not first_line:
        return  # the UI answers only once the service has: the stream is open end to end
    # The first event is through: the stream is open end to end, upstream included. The line
    # iterator stays referenced by the stack: collected, it would close the stream.
    lines = response.aiter_lines()
    stack.push_async_callback(lines.aclose)
    first = await anext(lines)
    assert first.startswith("id:"), first


async def chat_seconds(http: httpx.AsyncClient, base: str) -> float:
    body = {"model": "nanochat", "stream": True, "messages": [{"role": "user", "content": "hello"}]}
    started = time.monotonic()
    async with http.stream("POST", f"{base}/api/inference/v1/chat/completions", json=body) as response:
        assert response.status_code == 200, await response.aread()
        lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
    assert lines[-1] == "data: [DONE]"
    assert "You said: hello" in "".join(json.loads(x[5:])["choices"][0]["delta"].get("content", "") for x in lines[:-1])
    return time.monotonic() - started


async def flood(base: str, follow: str = FOLLOW, first_line: bool = True) -> dict:
    unlimited = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with (
        httpx.AsyncClient(timeout=10, limits=unlimited) as http,
        httpx.AsyncClient(timeout=10) as chatter,
        AsyncExitStack() as stack,
    ):
        assert (await chatter.post(f"{base}/api/session", json={"token": CHAT_TOKEN})).status_code == 200
        # Bounded: with one shared 100-connection pool the 101st stream waited for ever.
        opening = (open_stream(http, stack, base + follow, first_line) for _ in range(STREAMS))
        await asyncio.wait_for(asyncio.gather(*opening), 30)
        chat_s = await chat_seconds(chatter, base)
        models = await chatter.get(f"{base}/api/inference/v1/models")
        one_more = await http.get(base + follow)
        jobs = await chatter.get(f"{base}/api/trainer/v1/jobs")
        return {"chat_s": chat_s, "models": models, "one_more": one_more, "jobs": jobs}


def check_flood(seen: dict, webui: Proc, follow: str) -> None:
    assert seen["chat_s"] < 1.0, seen["chat_s"]
    assert seen["models"].status_code == 200 and seen["jobs"].status_code == 200
    refused = seen["one_more"]
    assert refused.status_code == 429, refused.text
    assert int(refused.headers["retry-after"]) > 0
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "too_many_streams"
    # The streams closed, their slots are free again: a new follow opens.
    poll(lambda: 'webui_proxy_open_streams{service="trainer"} 0.0' in httpx.get(f"{webui.url}/metrics").text)
    with httpx.stream("GET", webui.url + follow, timeout=10) as again:
        assert again.status_code == 200


def test_150_open_log_streams_leave_chat_answering_and_the_151st_is_refused(fake):
    webui = start_webui(fake.url)
    try:
        check_flood(asyncio.run(flood(webui.url)), webui, FOLLOW)
    finally:
        webui.stop()


@pytest.fixture
def trainer(tmp_path, redis_server):
    """The real trainer API (SQLite, a real Redis), no worker: a submitted job stays queued."""
    port = free_port()
    env = {
        **os.environ,
        "TRAINER_API_PORT": str(port),
        "TRAINER_DATABASE_URL": f"sqlite:///{tmp_path / 'trainer.db'}",
        "TRAINER_REDIS_URL": redis_server.url,
        "TRAINER_WRITE_TOKEN": "trainer-secret",
        "TRAINER_RUNS_DIR": str(tmp_path / "runs"),
        "TRAINER_DATA_DIR": str(tmp_path / "data"),
    }
    OUTPUT.mkdir(exist_ok=True)
    with open(tmp_path / "trainer.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "trainer", "api"], env=env, stdout=log, stderr=log)
    proc = Proc(f"http://127.0.0.1:{port}", process)
    try:
        wait_healthy(f"{proc.url}/health", process, limit_s=60)
        yield proc
    finally:
        proc.stop()


def test_150_log_streams_of_the_real_trainer_leave_chat_answering(fake, trainer):
    job = httpx.post(
        f"{trainer.url}/v1/jobs",
        json={"stage": "make_data", "options": {}, "output_name": "nanochat"},
        headers={"Authorization": "Bearer trainer-secret"},
        timeout=30,
    )
    assert job.status_code == 202, job.text
    follow = f"/api/trainer/v1/jobs/{job.json()['id']}/logs?follow=true"
    services = {"inference": f"{fake.url}/inference", "trainer": trainer.url, "registry": f"{fake.url}/registry"}
    webui = start_webui(None, services)
    try:
        check_flood(asyncio.run(flood(webui.url, follow, first_line=False)), webui, follow)
    finally:
        webui.stop()


def test_the_stream_cap_is_a_setting(fake):
    webui = start_webui(fake.url, WEBUI_MAX_STREAMS="2")
    try:

        async def three() -> httpx.Response:
            async with httpx.AsyncClient(timeout=10) as http, AsyncExitStack() as stack:
                for _ in range(2):
                    await open_stream(http, stack, webui.url + FOLLOW)
                return await http.get(webui.url + FOLLOW)

        assert asyncio.run(three()).status_code == 429
    finally:
        webui.stop()
