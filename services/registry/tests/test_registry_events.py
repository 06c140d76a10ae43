"""Events on a real redis-server: pub/sub + stream payloads, and a Redis outage never fails a commit."""

import json
import time

import redis
from fastapi.testclient import TestClient
from nanochat_testing.servers import free_port, start_redis
from registry.api import create_app
from registry.settings import Settings
from registry_testlib import TOKEN, files_of, publish


def test_events_reach_pubsub_and_stream(redis_server, tmp_path, name):
    settings = Settings(data_dir=tmp_path, redis_url=redis_server.url, write_token=TOKEN, log_level="WARNING")
    r = redis.Redis.from_url(redis_server.url)
    sub = r.pubsub()
    sub.subscribe("nanochat:events")
    sub.get_message(timeout=2)
    with TestClient(create_app(settings)) as client:
        v = publish(client, name, files_of("ev"), stage="rl")["version"]
        client.put(
            f"/v1/models/{name}/aliases/serving", json={"version": v}, headers={"Authorization": f"Bearer {TOKEN}"}
        )
        got, deadline = [], time.monotonic() + 10
        while len(got) < 2 and time.monotonic() < deadline:
            m = sub.get_message(timeout=1)
            if m and m["type"] == "message" and json.loads(m["data"])["name"] == name:
                got.append(json.loads(m["data"]))
    assert [(e["type"], e["version"], e["stage"]) for e in got] == [
        ("model.registered", v, "rl"),
        ("alias.moved", v, "rl"),
    ]
    assert got[1]["alias"] == "serving" and "alias" not in got[0] and all(isinstance(e["ts"], float) for e in got)
    stream = [json.loads(f[b"event"]) for _, f in r.xrange("nanochat:events:stream")]
    assert [e["type"] for e in stream if e["name"] == name] == ["model.registered", "alias.moved"]


def test_redis_down_does_not_fail_a_commit_and_the_event_arrives_later(tmp_path, name):
    port = free_port()
    settings = Settings(
        data_dir=tmp_path, redis_url=f"redis://127.0.0.1:{port}/0", write_token=TOKEN, log_level="ERROR"
    )
    with TestClient(create_app(settings)) as client:
        publisher = client.app.state.registry.events
        publisher.retry_s = 0.2
        v = publish(client, name, files_of("down"))["version"]
        assert client.get(f"/v1/resolve/{name}").json()["version"] == v
        assert publisher.pending() == 1
        server = start_redis(port)
        try:
            deadline = time.monotonic() + 15
            while publisher.pending() and time.monotonic() < deadline:
                time.sleep(0.1)
            stream = redis.Redis.from_url(server.url).xrange("nanochat:events:stream")
            events = [json.loads(f[b"event"]) for _, f in stream]
            assert [(e["type"], e["name"], e["version"]) for e in events] == [("model.registered", name, v)]
        finally:
            server.stop()
