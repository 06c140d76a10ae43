"""Hot swap with two tiny models: new requests go to the new one, old streams finish, the old is freed.

The registry tests run the real registry app (SQLite + local blobs) under uvicorn, and a real
redis-server from `nanochat_testing` for the events; a second run has no Redis and must still
swap by polling the resolve rules.
"""

import json
import threading

import httpx
import pytest
import uvicorn
from conftest import free_port, start_server, wait_for
from inference.served import ServedModel
from registry.api import create_app as create_registry
from registry.settings import Settings as RegistrySettings
from registry_client import RegistryClient

ASK = {"messages": [{"role": "user", "content": "What is 7*3?"}], "max_tokens": 12, "temperature": 0}


def greedy(url: str) -> str:
    return httpx.post(f"{url}/v1/chat/completions", json=ASK, timeout=60).json()["choices"][0]["message"]["content"]


def version(url: str):
    return httpx.get(f"{url}/v1/models").json()["data"][0]["version"]


def test_swap_lets_old_streams_finish_then_frees_the_old_model(checkpoints):
    b_server = start_server(model_dir=checkpoints["b"], slots=2)
    s = start_server(model_dir=checkpoints["a"], slots=4, max_len=1024)
    try:
        b_server.wait_ready()
        s.wait_ready()
        expected_b = greedy(b_server.url)
        before = greedy(s.url)
        assert before != expected_b
        old, new = s.manager.current, ServedModel.load(checkpoints["b"], s.app.state.settings, "nanochat")
        # Greedy on a random model loops rather than stopping: this stream runs to its length limit.
        body = {**ASK, "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            next(lines)
            s.manager.install(new)
            assert old.retired and s.manager.retiring == [old], "the old model must live while it streams"
            assert greedy(s.url) == expected_b
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
        wait_for(lambda: not old.scheduler.alive, what="the old model to be freed")
        assert s.manager.retiring == []
    finally:
        s.stop()
        b_server.stop()


class RegistryServer:
    def __init__(self, data_dir, redis_url: str | None):
        self.token = "registry-write"
        self.app = create_registry(
            RegistrySettings(data_dir=data_dir, write_token=self.token, redis_url=redis_url, log_level="WARNING")
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(self._up, what="the registry to start")

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.mark.slow
@pytest.mark.parametrize("events", ["redis", "polling"])
def test_registry_events_swap_the_served_model(checkpoints, tmp_path, request, events):
    redis_url = request.getfixturevalue("redis_server").url if events == "redis" else None
    registry = RegistryServer(tmp_path / "registry", redis_url)
    uploader = RegistryClient(registry.url, token=registry.token, cache_dir=tmp_path / "up-cache")
    s = start_server(
        registry_url=registry.url,
        redis_url=redis_url,
        model_cache_dir=tmp_path / "cache",
        poll_interval_s=30.0 if events == "redis" else 0.3,
        slots=2,
    )
    try:
        assert httpx.get(f"{s.url}/ready").status_code == 503
        uploader.upload_folder(checkpoints["a"], "nanochat", stage="base")  # never served: a base model
        v_a = uploader.upload_folder(checkpoints["a"], "nanochat", stage="sft").version
        s.wait_ready()
        assert version(s.url) == v_a
        v_b = uploader.upload_folder(checkpoints["b"], "nanochat", stage="rl").version
        wait_for(lambda: version(s.url) == v_b, timeout=30, what="the swap to the newest rl/sft version")
        uploader.set_alias("nanochat", "serving", v_a)
        wait_for(lambda: version(s.url) == v_a, timeout=30, what="the swap to the serving alias")
        assert httpx.get(f"{s.url}/v1/models").json()["data"][0]["stage"] == "sft"
    finally:
        s.stop()
        uploader.close()
        registry.stop()


@pytest.mark.slow
@pytest.mark.parametrize("events", ["redis", "polling"])
def test_a_deleted_version_stops_being_served(checkpoints, tmp_path, request, events):
    redis_url = request.getfixturevalue("redis_server").url if events == "redis" else None
    registry = RegistryServer(tmp_path / "registry", redis_url)
    uploader = RegistryClient(registry.url, token=registry.token, cache_dir=tmp_path / "up-cache")
    s = start_server(
        registry_url=registry.url,
        redis_url=redis_url,
        model_cache_dir=tmp_path / "cache",
        poll_interval_s=30.0 if events == "redis" else 0.3,
        slots=2,
    )
    try:
        v_a = uploader.upload_folder(checkpoints["a"], "nanochat", stage="sft").version
        v_b = uploader.upload_folder(checkpoints["b"], "nanochat", stage="rl").version
        wait_for(lambda: httpx.get(f"{s.url}/ready").status_code == 200 and version(s.url) == v_b, timeout=30)
        uploader.delete_version("nanochat", v_b)
        wait_for(
            lambda: s.manager.current is None or s.manager.current.info.version != v_b, timeout=30, what="v_b to go"
        )
        s.wait_ready()
        assert version(s.url) == v_a
        uploader.delete_version("nanochat", v_a)
        wait_for(lambda: httpx.get(f"{s.url}/ready").status_code == 503, timeout=30, what="v_a to go")
        r = httpx.post(f"{s.url}/v1/chat/completions", json=ASK, timeout=30)
        assert r.status_code == 503 and "deleted" in r.json()["error"]["message"], r.text
        assert httpx.get(f"{s.url}/v1/models").json()["data"] == []
    finally:
        s.stop()
        uploader.close()
        registry.stop()
