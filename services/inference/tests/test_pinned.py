"""Pinned versions: `model` of `nanochat:<version>` or `nanochat@<alias>` answered by exactly that
registry version, loaded on demand beside the served one.

A real registry process (`python -m registry`: SQLite, blobs in moto's S3, events on a real
redis-server, all from `nanochat_testing`) holds versions of two tiny random models whose greedy
replies differ: v1 and v3 = model "a", v2 = model "b" (the served one: newest sft/rl), v4 = "a".
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import start_server, wait_for
from nanochat_testing.servers import free_port
from registry_client import RegistryClient

pytestmark = pytest.mark.slow

TOKEN = "registry-write"
ASK = {"messages": [{"role": "user", "content": "What is 7*3?"}], "max_tokens": 12, "temperature": 0}


@pytest.fixture(scope="module")
def registry(s3_server, redis_server, tmp_path_factory, checkpoints):
    """The registry process holding v1..v4 of `nanochat`; yields (url, redis url, client)."""
    port, data = free_port(), tmp_path_factory.mktemp("pinned-registry")
    env = {
        **os.environ,
        "REGISTRY_PORT": str(port),
        "REGISTRY_DATA_DIR": str(data),
        "REGISTRY_BLOB_BACKEND": "s3",
        "REGISTRY_S3_ENDPOINT": s3_server.url,
        "REGISTRY_S3_BUCKET": f"pinned-{uuid.uuid4().hex[:8]}",
        "REGISTRY_S3_ACCESS_KEY": "testing",
        "REGISTRY_S3_SECRET_KEY": "testing",
        "REGISTRY_REDIS_URL": redis_server.url,
        "REGISTRY_WRITE_TOKEN": TOKEN,
        "REGISTRY_LOG_LEVEL": "WARNING",
    }
    log = open(data / "registry.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "registry"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url) or proc.poll() is not None, timeout=60, what="the registry to start")
        assert proc.poll() is None, (data / "registry.log").read_text()[-3000:]
        client = RegistryClient(url, token=TOKEN, cache_dir=data / "up-cache")
        for folder, stage in [("a", "sft"), ("b", "sft"), ("a", "base"), ("a", "base")]:
            client.upload_folder(checkpoints[folder], "nanochat", stage=stage)
        client.set_alias("nanochat", "serving", 2)
        yield url, redis_server.url, client
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def inference(registry, tmp_path, **settings):
    url, redis_url, _ = registry
    s = start_server(
        registry_url=url, redis_url=redis_url, model_cache_dir=tmp_path / "cache", slots=4, max_len=512, **settings
    )
    s.wait_ready()
    return s


def chat(s, model: str | None, **extra) -> httpx.Response:
    body = {**ASK, **extra} if model is None else {**ASK, "model": model, **extra}
    return httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=120)


def answer(s, model: str | None) -> tuple[str, str]:
    r = chat(s, model)
    assert r.status_code == 200, r.text
    return r.json()["model"], r.json()["choices"][0]["message"]["content"]


def ids(s) -> list[tuple[str, int, bool]]:
    return [(m["id"], m["version"], m["pinned"]) for m in httpx.get(f"{s.url}/v1/models").json()["data"]]


def error(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["param"] in ("model", None), err
    return err["message"]


def test_a_pinned_version_answers_beside_the_served_one(registry, tmp_path):
    s = inference(registry, tmp_path)
    try:
        served_id, served_text = answer(s, "nanochat")
        assert served_id == "nanochat:2" and answer(s, None) == (served_id, served_text)
        assert ids(s) == [("nanochat", 2, False)]
        card = httpx.get(f"{s.url}/v1/models/nanochat:1").json()
        assert (card["id"], card["version"], card["loaded"], card["context_length"]) == ("nanochat:1", 1, False, None)

        pinned_id, pinned_text = answer(s, "nanochat:1")
        assert pinned_id == "nanochat:1" and pinned_text != served_text, "v1 must answer, not the served v2"
        assert answer(s, "nanochat:2") == (served_id, served_text), "the served version by number is the served one"
        assert answer(s, "nanochat") == (served_id, served_text)
        assert ids(s) == [("nanochat", 2, False), ("nanochat:1", 1, True)]
        card = httpx.get(f"{s.url}/v1/models/nanochat%3A1").json()
        assert (card["version"], card["pinned"], card["loaded"], card["context_length"]) == (1, True, True, 512)

        # Streams and text completions name the version too.
        with httpx.stream(
            "POST", f"{s.url}/v1/chat/completions", json={**ASK, "model": "nanochat:1", "stream": True}
        ) as r:
            chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert {c["model"] for c in chunks} == {"nanochat:1"}
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == pinned_text
        r = httpx.post(f"{s.url}/v1/completions", json={"model": "nanochat:1", "prompt": "The quick", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["model"] == "nanochat:1", r.text
    finally:
        s.stop()


def test_alias_form_follows_the_alias_when_the_request_arrives(registry, tmp_path):
    _, _, client = registry
    client.set_alias("nanochat", "best", 1)
    s = inference(registry, tmp_path)
    try:
        pinned = answer(s, "nanochat:1")
        assert answer(s, "nanochat@best") == pinned
        assert httpx.get(f"{s.url}/v1/models/nanochat@best").json()["version"] == 1
        client.set_alias("nanochat", "best", 2)
        assert answer(s, "nanochat@best") == answer(s, "nanochat")
        assert answer(s, "nanochat@serving")[0] == "nanochat:2"
    finally:
        s.stop()


def test_unknown_names_versions_and_aliases_are_404s(registry, tmp_path):
    url, _, _ = registry
    spec = {"size": 3, "sha256": hashlib.sha256(b"abc").hexdigest()}
    pending = httpx.post(
        f"{url}/v1/models/nanochat/versions",
        headers={"Authorization": f"Bearer {TOKEN}"},
        json={"stage": "sft", "files": {"model.bin": spec}},
    ).json()["version"]
    s = inference(registry, tmp_path)
    try:
        assert "not found in state ready" in error(chat(s, f"nanochat:{pending}"), 404, "model_not_found")
        assert "nanochat v99" in error(chat(s, "nanochat:99"), 404, "model_not_found")
        assert "'nope'" in error(chat(s, "nanochat@nope"), 404, "model_not_found")
        assert "'other:1'" in error(chat(s, "other:1"), 404, "model_not_found")
        error(chat(s, "gpt-4"), 404, "model_not_found")
        error(chat(s, "nanochat:one"), 400, "invalid_value")
        error(chat(s, "nanochat:0"), 400, "invalid_value")
        error(chat(s, f"nanochat:{2**31}"), 400, "invalid_value")  # past the registry's versions (was a 503)
        error(chat(s, "nanochat:" + "9" * 5000), 400, "invalid_value")  # past int()'s digit limit (was a 500)
        for model in ("nanochat:99", "nanochat@nope", "other", "nanochat:x", "nanochat:" + "9" * 5000):
            r = httpx.get(f"{s.url}/v1/models/{model}")
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found", (model, r.text)
        assert ids(s) == [("nanochat", 2, False)], "a refused request loads nothing"
    finally:
        s.stop()


def test_the_least_recently_used_idle_pinned_model_is_evicted(registry, tmp_path):
    s = inference(registry, tmp_path, max_pinned=2)
    try:
        for model in ("nanochat:1", "nanochat:3", "nanochat:1"):
            assert answer(s, model)[0] == model
        v1, v3 = s.manager.pinned.get(1), s.manager.pinned.get(3)
        assert answer(s, "nanochat:4")[0] == "nanochat:4"
        assert [i for i, _, pinned in ids(s) if pinned] == ["nanochat:1", "nanochat:4"], "v3 was used least recently"
        wait_for(lambda: not v3.scheduler.alive, timeout=30, what="the evicted model process to stop")
        assert v1.scheduler.alive and s.manager.pinned.get(1) is v1
        metrics = httpx.get(f"{s.url}/metrics").text
        for sample in (
            "inference_pinned_models 2.0",
            "inference_pinned_evictions_total 1.0",
            'inference_pinned_loads_total{outcome="ok"} 3.0',
        ):
            assert sample in metrics.splitlines(), sample
    finally:
        s.stop()


def test_requests_arriving_while_a_version_loads_share_its_load(registry, tmp_path):
    s = inference(registry, tmp_path, max_pinned=1)
    try:
        # With room for one pinned model, a second load of the same version would find the pool
        # full (its first load is not evictable) and answer 503: every request must wait on one load.
        with ThreadPoolExecutor(3) as pool:
            answers = list(pool.map(lambda _: chat(s, "nanochat:3"), range(3)))
        assert [r.status_code for r in answers] == [200] * 3, [r.text for r in answers]
        assert {r.json()["model"] for r in answers} == {"nanochat:3"}
        assert len({r.json()["choices"][0]["message"]["content"] for r in answers}) == 1
        assert s.manager.pinned.get(3).active == 0
    finally:
        s.stop()


def test_busy_pinned_models_are_never_evicted(registry, tmp_path):
    s = inference(registry, tmp_path, max_pinned=1)
    try:
        assert answer(s, "nanochat:1")[0] == "nanochat:1"
        # Greedy on a random model loops rather than stopping: this stream runs to its length limit.
        body = {**ASK, "model": "nanochat:1", "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{s.url}/v1/chat/completions", json=body, timeout=60) as stream:
            lines = stream.iter_lines()
            next(lines)
            r = chat(s, "nanochat:3")
            assert "busy" in error(r, 503, "pinned_models_busy") and r.headers["Retry-After"]
            assert answer(s, "nanochat")[0] == "nanochat:2", "the served model answers meanwhile"
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        wait_for(lambda: s.manager.pinned.get(1).active == 0, what="the stream's release")
        assert answer(s, "nanochat:3")[0] == "nanochat:3"
        assert [i for i, _, pinned in ids(s) if pinned] == ["nanochat:3"]
    finally:
        s.stop()


def test_pinning_disabled_refuses_other_versions_but_serves_the_served_one(registry, tmp_path):
    s = inference(registry, tmp_path, max_pinned=0)
    try:
        assert "pinning versions is off" in error(chat(s, "nanochat:1"), 400, "pinning_disabled")
        assert answer(s, "nanochat:2")[0] == "nanochat:2"
        assert answer(s, "nanochat@serving")[0] == "nanochat:2"
        assert ids(s) == [("nanochat", 2, False)]
    finally:
        s.stop()


def test_a_slow_load_is_a_bounded_wait_then_serves(registry, tmp_path):
    s = inference(registry, tmp_path, pinned_load_timeout_s=0.05)
    try:
        started = time.monotonic()
        r = chat(s, "nanochat:1")
        assert "still loading" in error(r, 503, "model_loading") and r.headers["Retry-After"]
        assert time.monotonic() - started < 5, "the wait is bounded by INFERENCE_PINNED_LOAD_TIMEOUT_S"
        wait_for(lambda: s.manager.pinned.get(1) is not None, timeout=60, what="the load to go on and finish")
        assert answer(s, "nanochat:1")[0] == "nanochat:1"
        assert s.manager.pinned.get(1).active == 0, "the waiter that gave up holds nothing"
    finally:
        s.stop()


def test_serving_a_pinned_version_promotes_its_model_process(registry, tmp_path):
    _, _, client = registry
    s = inference(registry, tmp_path)
    try:
        pinned_answer = answer(s, "nanochat:1")
        pinned = s.manager.pinned.get(1)
        client.set_alias("nanochat", "serving", 1)
        wait_for(lambda: s.manager.current.info.version == 1, timeout=30, what="the swap to v1")
        assert s.manager.current is pinned, "the pinned process is served, not loaded a second time"
        assert ids(s) == [("nanochat", 1, False)]
        assert answer(s, "nanochat") == pinned_answer
    finally:
        client.set_alias("nanochat", "serving", 2)
        s.stop()


def test_serving_a_version_while_it_loads_as_pinned_loads_it_once(registry, tmp_path):
    _, _, client = registry
    s = inference(registry, tmp_path, pinned_load_timeout_s=0.05)
    try:
        error(chat(s, "nanochat:1"), 503, "model_loading")
        assert s.manager.pinned.loading() == 1
        client.set_alias("nanochat", "serving", 1)
        wait_for(lambda: s.manager.current.info.version == 1, timeout=60, what="the swap to v1")
        assert s.manager.pinned.loading() == 0 and s.manager.pinned.get(1) is None, "v1 was loaded twice"
        assert ids(s) == [("nanochat", 1, False)]
    finally:
        client.set_alias("nanochat", "serving", 2)
        s.stop()


def test_a_deleted_pinned_version_is_dropped(registry, tmp_path):
    _, _, client = registry
    s = inference(registry, tmp_path)
    try:
        assert answer(s, "nanochat:4")[0] == "nanochat:4"
        client.delete_version("nanochat", 4)
        wait_for(lambda: s.manager.pinned.get(4) is None, timeout=30, what="v4 to be dropped")
        assert ids(s) == [("nanochat", 2, False)]
        error(chat(s, "nanochat:4"), 404, "model_not_found")
    finally:
        s.stop()


def test_a_killed_pinned_model_process_is_loaded_again(registry, tmp_path):
    s = inference(registry, tmp_path)
    try:
        first = answer(s, "nanochat:1")
        pinned = s.manager.pinned.get(1)
        os.kill(pinned.scheduler.process.pid, signal.SIGKILL)
        wait_for(lambda: not pinned.scheduler.alive, what="the pinned model process to die")
        assert answer(s, "nanochat:1") == first
        assert s.manager.pinned.get(1) is not pinned and answer(s, "nanochat")[0] == "nanochat:2"
    finally:
        s.stop()


def test_a_version_deleted_while_it_loads_is_not_pinned(registry, tmp_path):
    """Last in this file: it deletes v3 from the module's registry."""
    _, _, client = registry
    s = inference(registry, tmp_path, pinned_load_timeout_s=0.05)
    try:
        error(chat(s, "nanochat:3"), 503, "model_loading")
        # Deleted once downloaded, while its model process starts.
        wait_for(lambda: (tmp_path / "cache" / "nanochat" / "v3").is_dir(), timeout=30, what="the download")
        client.delete_version("nanochat", 3)
        wait_for(lambda: s.manager.pinned.loading() == 0, timeout=60, what="the load to end")
        assert s.manager.pinned.get(3) is None and ids(s) == [("nanochat", 2, False)]
        error(chat(s, "nanochat:3"), 404, "model_not_found")
    finally:
        s.stop()


@pytest.mark.parametrize("status", [401, 403])
def test_a_registry_refusing_our_token_is_a_502_naming_the_token_not_a_retry(status):
    """Plain function, no processes: the registry's 401/403 for this server's own token is a
    configuration fault (502, no Retry-After), not the 503 'retry shortly' of a registry away."""
    from types import SimpleNamespace

    from inference.model_choice import registry_version
    from inference.model_ref import ModelRef
    from registry_client.client import RegistryError
    from service_kit.errors import APIError

    class Refusing:
        def get_version(self, name, version):
            raise RegistryError(status, "invalid token")

    with pytest.raises(APIError) as caught:
        registry_version(SimpleNamespace(registry=Refusing()), ModelRef("nanochat", version=3), "nanochat:3")
    assert caught.value.status == 502 and caught.value.code == "registry_auth_failed"
    assert "INFERENCE_REGISTRY_TOKEN" in caught.value.message and not caught.value.headers
