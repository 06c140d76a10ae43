"""The jobs API under faults and hostile input (issue 26): Redis down at submit and at cancel,
out-of-range offsets, windows of a huge log, the curves of a growing events file, capped and
shared log followers (real HTTP through uvicorn), and option URLs and paths it refuses."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from nanochat.dataset import download_file
from nanochat_contracts.job_folder import events_path, log_path
from nanochat_testing.data import TINY_DATA
from nanochat_testing.servers import Server, free_port, start_postgres, start_redis
from sqlalchemy import event, update
from trainer.api import create_app
from trainer.db import Job
from trainer.settings import Settings
from trainer_testlib import AUTH

ERROR_SHAPE = {"message", "type", "param", "code"}


def submit(api, body, headers=None):
    return api.post("/v1/jobs", json=body, headers={**AUTH, **(headers or {})})


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_SHAPE, body
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


class RestartableRedis:
    """A redis-server of this test alone, stopped and started again on the same port."""

    def __init__(self) -> None:
        self.server: Server = start_redis()
        self.port, self.url = self.server.port, self.server.url

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        self.server = start_redis(self.port)


@pytest.fixture
def own_redis() -> Iterator[RestartableRedis]:
    redis = RestartableRedis()
    yield redis
    redis.stop()


@pytest.fixture
def redis_api(settings: Settings, own_redis: RestartableRedis) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"redis_url": own_redis.url}))) as client:
        yield client


def test_a_submit_that_cannot_queue_leaves_no_job_and_frees_its_idempotency_key(redis_api, own_redis):
    body = {"stage": "make_data", "options": TINY_DATA}
    own_redis.stop()
    refused = submit(redis_api, body, {"Idempotency-Key": "blip-1"})
    assert_error(refused, 503)
    assert int(refused.headers["Retry-After"]) > 0
    assert redis_api.get("/v1/jobs").json()["total"] == 0
    own_redis.start()
    retried = submit(redis_api, body, {"Idempotency-Key": "blip-1"})
    assert retried.status_code == 202, retried.text
    assert retried.json()["status"] == "queued"
    again = submit(redis_api, body, {"Idempotency-Key": "blip-1"})
    assert again.json()["id"] == retried.json()["id"]
    assert redis_api.get("/v1/jobs").json()["total"] == 1
    assert "trainer_queue_depth 1.0" in redis_api.get("/metrics").text


def test_cancel_with_redis_down_is_recorded_in_the_database_and_answers_503(redis_api, own_redis):
    queued = submit(redis_api, {"stage": "make_data", "options": TINY_DATA}).json()
    running = submit(redis_api, {"stage": "make_data", "options": TINY_DATA}).json()
    db = redis_api.app.state.trainer.db
    with db.session() as s:
        s.execute(update(Job).where(Job.id == running["id"]).values(status="running"))
    own_redis.stop()
    for job, status in [(queued, "cancelled"), (running, "running")]:
        r = redis_api.post(f"/v1/jobs/{job['id']}/cancel", headers=AUTH)
        error = assert_error(r, 503)
        assert "recorded" in error["message"] and int(r.headers["Retry-After"]) > 0
        after = redis_api.get(f"/v1/jobs/{job['id']}").json()
        # The worker's stop check and the reaper read the database: the cancel is not lost.
        assert after["cancel_requested"] is True and after["status"] == status


@pytest.mark.parametrize(
    "path, params",
    [
        ("/v1/jobs", {"offset": 10**20}),
        ("/v1/jobs", {"offset": -1}),
        ("/v1/jobs", {"limit": 10**20}),
        ("{job}/logs", {"offset": 10**20}),
        ("{job}/logs", {"offset": -5}),
        ("{job}/logs", {"tail": 10**20}),
        ("{job}/logs", {"limit": 0}),
        ("{job}/logs", {"node": 10**20}),
        ("{job}/events", {"offset": 10**20}),
    ],
)
def test_out_of_range_offsets_are_422_with_the_error_shape(api, path, params):
    job = submit(api, {"stage": "make_data", "options": TINY_DATA}).json()
    r = api.get(path.format(job=f"/v1/jobs/{job['id']}"), params=params)
    assert_error(r, 422, param=next(iter(params)))


def test_a_huge_last_event_id_is_400_with_the_error_shape(api):
    job = submit(api, {"stage": "make_data", "options": TINY_DATA}).json()
    for path in ("logs?follow=true", "events", "logs"):
        assert_error(api.get(f"/v1/jobs/{job['id']}/{path}", headers={"Last-Event-ID": str(10**20)}), 400)


@pytest.mark.parametrize(
    "body, param",
    [
        ('{"stage": "make_data", "options": {"model_name": "\\ud800"}}', "options.model_name"),
        (
            '{"pipeline": "speedrun", "options": {"make_data": {"model_name": "x\\udfff"}}}',
            "options.make_data.model_name",
        ),
        (
            '{"stage": "make_data", "options": {"source": "download", "fineweb_url": "http://h:99999/"}}',
            "options.fineweb_url",
        ),
        (
            '{"stage": "make_data", "options": {"source": "python-docs", "docs_path": "/a\\u0000b"}}',
            "options.docs_path",
        ),
    ],
)
def test_hostile_job_requests_are_422_naming_the_field(api, body, param):
    r = api.post("/v1/jobs", content=body, headers={**AUTH, "Content-Type": "application/json"})
    assert_error(r, 422, param=param)
    assert api.get("/v1/jobs").json()["total"] == 0


def test_malformed_job_ids_and_event_ids_are_4xx(api):
    for job_id in ("%00", "a" * 5000, "..%2f..%2fetc", "0" * 31 + "\u00e9"):
        assert_error(api.get(f"/v1/jobs/{job_id}"), 404)
    job = submit(api, {"stage": "make_data", "options": TINY_DATA}).json()
    for value in ("1_000", " 12", "-0", "9" * 5000, "\u00e9".encode()):
        assert_error(api.get(f"/v1/jobs/{job['id']}/logs", headers={"Last-Event-ID": value}), 400)


def test_plain_logs_answer_a_bounded_window_of_a_huge_log(api, settings):
    job = submit(api, {"stage": "make_data", "options": TINY_DATA}).json()
    path = log_path(settings.runs_dir, job["id"], 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = b"0123456789abcdef" * 7 + b"\n"  # 113 bytes
    with open(path, "wb") as f:
        f.write(line * (64 * 1024 * 1024 // len(line)))
    size = path.stat().st_size
    url = f"/v1/jobs/{job['id']}/logs"
    first = api.get(url)
    assert first.status_code == 200 and len(first.content) == 1 << 20
    assert first.headers["X-Next-Offset"] == str(1 << 20) and first.headers["X-Log-Size"] == str(size)
    window = api.get(url, params={"offset": 1000, "limit": 500})
    assert window.content == (line * 20)[1000:1500] and window.headers["X-Next-Offset"] == "1500"
    tail = api.get(url, params={"tail": 300})
    assert tail.content == (line * 3)[-300:] and tail.headers["X-Next-Offset"] == str(size)
    assert api.get(url, params={"offset": size + 10}).content == b""
    assert_error(api.get(url, params={"tail": 10, "offset": 5}), 422, param="tail")
    assert_error(api.get(url, params={"follow": "true", "limit": 5}), 422, param="limit")


def test_a_followed_log_line_longer_than_a_chunk_is_sent_whole(api, settings):
    job = submit(api, {"stage": "make_data", "options": TINY_DATA}).json()
    with api.app.state.trainer.db.session() as s:
        s.execute(update(Job).where(Job.id == job["id"]).values(status="failed"))
    path = log_path(settings.runs_dir, job["id"], 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * 200_000 + b"\nend")
    text = api.get(f"/v1/jobs/{job['id']}/logs", params={"follow": "true"}).text
    data = "".join(line[6:] for line in text.split("\n") if line.startswith("data: ") and "offset" not in line)
    assert data == "x" * 200_000 + "end"
    assert f"id: {path.stat().st_size}\nevent: end" in text


def write_events(path: Path, events: list[dict], mode: str = "a") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        f.write("".join(json.dumps(e) + "\n" for e in events))


def test_metrics_read_only_what_was_appended_to_the_events_file(api, settings):
    job = submit(api, {"stage": "make_data", "options": TINY_DATA}).json()
    path = events_path(settings.runs_dir, job["id"])
    url = f"/v1/jobs/{job['id']}/metrics"
    step = {"stage": "base_train", "type": "progress", "loss": 8.0}
    write_events(path, [{**step, "step": 1}, {**step, "step": 2, "loss": 7.0}], mode="w")
    assert api.get(url).json()["series"]["loss"] == [[1, 8.0], [2, 7.0]]
    # An edit of what was read already is not seen (nothing is parsed twice); an appended line is,
    # and so is a half-written line once it is whole.
    path.write_text(path.read_text().replace('"loss": 8.0', '"loss": 9.0'))
    with open(path, "a") as f:
        f.write(json.dumps({**step, "step": 3, "loss": 6.0}) + "\n" + '{"stage": "base_train", "type": "prog')
    assert api.get(url).json()["series"]["loss"] == [[1, 8.0], [2, 7.0], [3, 6.0]]
    with open(path, "a") as f:
        f.write('ress", "step": 4, "loss": 5.0}\n')
    assert api.get(url).json()["series"]["loss"][-1] == [4, 5.0]
    # A file replaced by a new one (a new attempt's events) is read from its start.
    replacement = path.with_suffix(".new")
    write_events(replacement, [{**step, "step": 1, "loss": 3.0}], mode="w")
    os.replace(replacement, path)
    assert api.get(url).json()["series"]["loss"] == [[1, 3.0]]


def test_metrics_skip_events_that_are_no_curve_points(api, settings):
    job = submit(api, {"stage": "make_data", "options": TINY_DATA}).json()
    path = events_path(settings.runs_dir, job["id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        '{"stage": "a", "type": "progress", "step": "s", "loss": 1}',
        '{"stage": "a", "type": "progress", "step": 1' + "0" * 400 + ', "loss": 1}',
        '{"stage": "a", "type": "progress", "step": 2, "loss": true}',
        '{"stage": 1}',
        "[1]",
        "[" * 100_000,
        '{"stage": "a", "type": "eval", "name": [1], "value": 1}',
        '{"stage": "a", "type": "progress", "step": 3, "loss": 0.5}',
    ]
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe\n")
    r = api.get(f"/v1/jobs/{job['id']}/metrics", params={"stage": "a"})
    assert r.status_code == 200, r.text
    assert r.json()["series"] == {"loss": [[3, 0.5]]}


@contextmanager
def served(settings: Settings) -> Iterator[tuple[str, object]]:
    """The app under a real uvicorn on a free port (in a thread, so the test can see its database)."""
    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def read_until(chunks: Iterator[str], needle: str) -> str:
    """Read a stream's text until `needle`; `chunks` is the stream's one iterator (a second one
    would close the stream when the first is dropped)."""
    seen = ""
    for chunk in chunks:
        seen += chunk
        if needle in seen:
            break
    return seen


def stream_status(client: httpx.Client, path: str) -> int:
    with client.stream("GET", path) as r:
        return r.status_code


def test_followers_are_capped_and_share_one_job_poll(settings):
    settings = settings.model_copy(update={"max_followers": 4, "follow_poll_s": 1.0})
    with served(settings) as (url, app), httpx.Client(base_url=url, timeout=10) as client:
        job_id = client.post("/v1/jobs", json={"stage": "make_data", "options": TINY_DATA}, headers=AUTH).json()["id"]
        path = log_path(settings.runs_dir, job_id, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("first line\n")
        selects: list[str] = []

        @event.listens_for(app.state.trainer.db.engine, "before_cursor_execute")
        def count(conn, cursor, statement, *args) -> None:
            # One job's row by id: what a follower's check asks (the reaper's scans ask otherwise).
            if statement.lstrip().startswith("SELECT") and "WHERE jobs.id = " in statement:
                selects.append(statement)

        with httpx.Client(base_url=url, timeout=10) as streams:
            opened = [
                streams.stream("GET", f"/v1/jobs/{job_id}/{p}")
                for p in ("logs?follow=true", "logs?follow=true", "logs?follow=true", "events")
            ]
            responses = [o.__enter__() for o in opened]
            assert all(r.status_code == 200 for r in responses)
            texts = [r.iter_text() for r in responses]
            assert all("first line" in read_until(t, "first line") for t in texts[:3])
            refused = client.get(f"/v1/jobs/{job_id}/logs", params={"follow": "true"})
            assert_error(refused, 429)
            assert int(refused.headers["Retry-After"]) > 0
            selects.clear()
            time.sleep(3)
            # Four followers for 3 s at 5 checks a second each were 60 queries; one shared check a second is 3.
            assert len(selects) <= 5, selects
            opened[0].__exit__(None, None, None)
            deadline = time.monotonic() + 5
            while (status := stream_status(client, f"/v1/jobs/{job_id}/events")) == 429:
                assert time.monotonic() < deadline, "a closed stream's slot was never given back"
                time.sleep(0.1)
            assert status == 200
            with app.state.trainer.db.session() as s:
                s.execute(update(Job).where(Job.id == job_id).values(status="failed"))
            with open(path, "a") as f:
                f.write("last line\n")
            tail = read_until(texts[1], "event: end")
            assert "last line" in tail and "event: end" in tail and "\r" not in tail
            for o in opened[1:]:
                o.__exit__(None, None, None)


def test_a_database_that_is_gone_is_503_and_open_streams_ride_it_out(settings):
    postgres = start_postgres()
    try:
        database_url = "postgresql+psycopg://" + postgres.url.split("://", 1)[1]
        settings = settings.model_copy(update={"database_url": database_url})
        with served(settings) as (url, _), httpx.Client(base_url=url, timeout=20) as client:
            body = {"stage": "make_data", "options": TINY_DATA}
            job_id = client.post("/v1/jobs", json=body, headers=AUTH).json()["id"]
            path = log_path(settings.runs_dir, job_id, 0)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("before\n")
            with client.stream("GET", f"/v1/jobs/{job_id}/logs", params={"follow": "true"}) as stream:
                chunks = stream.iter_text()
                assert "before" in read_until(chunks, "before")
                postgres.stop()
                with httpx.Client(base_url=url, timeout=20) as other:
                    for r in (
                        other.get("/v1/jobs"),
                        other.get(f"/v1/jobs/{job_id}"),
                        other.post("/v1/jobs", json=body, headers=AUTH),
                        other.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH),
                    ):
                        assert_error(r, 503)
                        assert int(r.headers["Retry-After"]) > 0
                with open(path, "a") as f:
                    f.write("during\n")
                assert "during" in read_until(chunks, "during")
    finally:
        postgres.stop()


def test_option_urls_must_be_http_or_https(api):
    base = {"source": "download"}
    for url in ("file:///etc/passwd", "ftp://example.org/x", "gopher://h/", "http://", "javascript:alert(1)"):
        r = submit(api, {"stage": "make_data", "options": {**base, "fineweb_url": url}})
        assert_error(r, 422, param="options.fineweb_url")
    r = submit(
        api, {"pipeline": "speedrun", "preset": "tiny", "options": {"make_data": {**base, "datasets_url": "file:///"}}}
    )
    assert_error(r, 422, param="options.make_data.datasets_url")
    ok = submit(api, {"stage": "make_data", "options": {**base, "core_bundle_url": "https://example.org/b.zip"}})
    assert ok.status_code == 202, ok.text
    assert api.get("/v1/jobs").json()["total"] == 1


def test_option_paths_must_lie_in_the_data_root(api, settings):
    docs = {"stage": "make_data", "options": {"source": "python-docs"}}
    root = settings.data_dir.resolve()
    for bad in ("/etc", str(root / ".." / "elsewhere"), "relative/docs", str(root) + "-sibling"):
        r = submit(api, {**docs, "options": {**docs["options"], "docs_path": bad}})
        assert_error(r, 422, param="options.docs_path")
    for good in (str(root / "docs"), None):
        options = {**docs["options"], **({"docs_path": good} if good else {})}
        assert submit(api, {**docs, "options": options}).status_code == 202
    model = {"name": "absent-model", "version": 1}
    for bad in ("/etc", "../../etc", "eval_bundle/../../x"):
        r = submit(api, {"stage": "base_eval", "options": {"bundle": bad}, "input": model})
        assert_error(r, 422, param="options.bundle")
    # In the root, the bundle passes the option checks and the request goes on to the input.
    for good in ("eval_bundle", str(root / "core")):
        assert submit(api, {"stage": "base_eval", "options": {"bundle": good}, "input": model}).status_code == 404


class Redirector(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/data":
            self.send_response(200)
            self.send_header("Content-Length", "4")
            self.end_headers()
            self.wfile.write(b"data")
            return
        self.send_response(302)
        self.send_header(
            "Location", {"/to-file": "file:///etc/passwd", "/to-ftp": "ftp://127.0.0.1/x"}.get(self.path, "/data")
        )
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_downloads_follow_only_http_redirects(tmp_path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert download_file(f"{base}/same-host", tmp_path / "ok").read_bytes() == b"data"
        for where in ("to-file", "to-ftp"):
            with pytest.raises(OSError, match="(?i)redirect"):
                download_file(f"{base}/{where}", tmp_path / where, retries=1)
            assert not (tmp_path / where).exists()
    finally:
        server.shutdown()
