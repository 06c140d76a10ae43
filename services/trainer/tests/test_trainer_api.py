"""The jobs API without workers: validation, auth, idempotency, both path spellings, multi-node
jobs only with the ray executor, queued cancel, listing, input resolution against the real registry, health and metrics."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from nanochat_contracts.job_folder import events_path
from nanochat_testing.data import TINY_DATA
from redis import Redis
from registry_client import RegistryClient
from trainer.api import create_app
from trainer.curves import curves
from trainer.dispatch import make_queue
from trainer_testlib import AUTH, REGISTRY_TOKEN


def submit(api, body, headers=None, path="/v1/jobs"):
    return api.post(path, json=body, headers={**AUTH, **(headers or {})})


def test_stages_are_served_as_json_schema(api):
    body = api.get("/v1/stages").json()
    stages = {s["name"]: s for s in body["stages"]}
    assert stages["base_train"]["input_stage"] == "tokenizer"
    assert stages["tok_train"]["output_stage"] == "tokenizer"
    assert "depth" in stages["base_train"]["options_schema"]["properties"]
    # What the trainer sets itself is not offered: a form built from the schema must submit cleanly.
    for stage in stages.values():
        assert not {"data_dir", "out", "init_from", "job_id", "input_version"} & set(
            stage["options_schema"]["properties"]
        )
    assert body["pipelines"]["speedrun"][0] == "make_data"
    assert "tiny" in body["presets"]


@pytest.mark.parametrize("path", ["/v1/jobs", "/jobs"])
def test_submit_answers_202_with_the_job_on_both_paths(api, path):
    r = submit(api, {"stage": "make_data", "options": TINY_DATA}, path=path)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["stage"] == "make_data"
    assert job["steps"][0]["options"]["synthetic_docs"] == 300
    assert r.headers["Location"].endswith(f"/jobs/{job['id']}")
    assert api.get(f"{path}/{job['id']}").json()["id"] == job["id"]


def test_bad_options_are_422_naming_the_field_and_queue_nothing(api):
    r = submit(api, {"stage": "base_train", "options": {"depth": 0}, "input": {"name": "m", "version": 1}})
    assert r.status_code == 422
    assert r.json()["error"]["param"] == "options.depth"
    r = submit(api, {"stage": "tok_train", "options": {"vocab_sise": 300}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "options.vocab_sise"
    r = submit(api, {"pipeline": "speedrun", "preset": "tiny", "options": {"base_train": {"matrix_lr": -1}}})
    assert r.status_code == 422 and r.json()["error"]["param"] == "options.base_train.matrix_lr"
    r = submit(api, {"stage": "make_data", "options": {"data_dir": "/etc"}})
    assert r.status_code == 422 and "set by the trainer" in r.json()["error"]["message"]
    r = submit(api, {"stage": "no_such_stage"})
    assert r.status_code == 422 and "unknown stage" in r.text
    r = submit(api, {"stage": "make_data", "resources": {"nproc_per_node": 0}})
    assert r.status_code == 422
    assert api.get("/v1/jobs").json()["total"] == 0


def test_a_multi_node_job_without_the_ray_executor_is_422_naming_the_fix(api):
    r = submit(api, {"stage": "make_data", "resources": {"nnodes": 2, "nproc_per_node": 1}})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert set(r.json()) == {"error"} and set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_value",
        "resources.nnodes",
    )
    assert "TRAINER_EXECUTOR=ray" in error["message"] and "executor is local" in error["message"]
    assert api.get("/v1/jobs").json()["total"] == 0
    assert submit(api, {"stage": "make_data", "options": TINY_DATA}).status_code == 202


def test_with_the_ray_executor_a_multi_node_job_waits_on_the_queue_only_ray_workers_drain(settings, redis_server):
    with TestClient(create_app(settings.model_copy(update={"executor": "ray"}))) as api:
        r = submit(api, {"stage": "make_data", "resources": {"nnodes": 2, "nproc_per_node": 1}})
        assert r.status_code == 202, r.text
        assert [n["status"] for n in r.json()["nodes"]] == ["queued", "queued"]
        assert "trainer_queue_depth 2.0" in api.get("/metrics").text
    redis = Redis.from_url(redis_server.url)
    assert make_queue(settings, redis).count == 0
    assert make_queue(settings, redis, multi_node=True).count == 2


def test_a_pipeline_becomes_its_stages_with_the_preset_and_overrides(api):
    r = submit(api, {"pipeline": "speedrun", "preset": "tiny", "options": {"base_train": {"depth": 2}}})
    assert r.status_code == 202, r.text
    steps = r.json()["steps"]
    assert [s["stage"] for s in steps][:4] == ["make_data", "tok_train", "tok_eval", "base_train"]
    assert len(steps) == 13 and steps[-1]["stage"] == "report"
    assert steps[1]["options"]["vocab_size"] == 4096 and steps[3]["options"]["depth"] == 2
    assert steps[3]["options"]["max_seq_len"] == 256 and "data_dir" not in steps[3]["options"]
    job = api.get(f"/v1/jobs/{r.json()['id']}").json()
    assert job["pipeline"] == "speedrun" and job["progress"] == 0.0


def test_writes_need_the_bearer_token(api):
    assert api.post("/v1/jobs", json={"stage": "make_data"}).status_code == 401
    assert (
        api.post("/v1/jobs", json={"stage": "make_data"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    )
    assert api.post("/v1/jobs/x/cancel").status_code == 401
    assert api.get("/v1/jobs").status_code == 200


def test_401_404_422_share_the_error_shape(api):
    shape = {"message", "type", "param", "code"}
    refused = api.post("/v1/jobs", json={"stage": "make_data"})
    missing = api.get("/v1/jobs/no-such-job")
    unknown_route = api.get("/v1/no-such-route")
    invalid = api.get("/v1/jobs", params={"limit": 0})
    for r, status in [(refused, 401), (missing, 404), (unknown_route, 404), (invalid, 422)]:
        assert r.status_code == status and set(r.json()) == {"error"} and set(r.json()["error"]) == shape, r.text
    assert refused.json()["error"]["type"] == "authentication_error"
    assert missing.json()["error"]["code"] == unknown_route.json()["error"]["code"] == "not_found"
    assert invalid.json()["error"]["param"] == "limit" and invalid.json()["error"]["code"] == "invalid_value"


def test_idempotency_key_returns_the_same_job(api):
    body = {"stage": "make_data", "options": TINY_DATA}
    first = submit(api, body, {"Idempotency-Key": "k-1"}).json()
    again = submit(api, body, {"Idempotency-Key": "k-1"})
    assert again.status_code == 202 and again.json()["id"] == first["id"]
    assert api.get("/v1/jobs").json()["total"] == 1
    other = submit(api, {"stage": "make_data"}, {"Idempotency-Key": "k-1"})
    assert other.status_code == 409


def test_cancel_of_a_queued_job_ends_it_and_list_filters(api):
    ids = [submit(api, {"stage": "make_data", "options": TINY_DATA}).json()["id"] for _ in range(3)]
    r = api.post(f"/jobs/{ids[0]}/cancel", headers=AUTH)
    assert r.status_code == 202 and r.json()["status"] == "cancelled"
    assert api.post(f"/v1/jobs/{ids[0]}/cancel", headers=AUTH).status_code == 409
    assert [j["id"] for j in api.get("/v1/jobs?status=cancelled").json()["items"]] == [ids[0]]
    page = api.get("/v1/jobs?status=queued&limit=1&offset=1").json()
    assert page["total"] == 2 and len(page["items"]) == 1
    assert api.get("/v1/jobs?status=bogus").status_code == 422
    assert api.get("/v1/jobs/nope").status_code == 404


def test_input_is_resolved_against_the_registry(api, registry_url, tmp_path):
    missing = submit(api, {"stage": "tok_eval", "input": {"name": "absent-model", "version": 7}})
    assert missing.status_code == 404
    needs = submit(api, {"stage": "tok_eval"})
    assert needs.status_code == 422 and needs.json()["error"]["param"] == "input"
    unexpected = submit(api, {"stage": "tok_train", "input": {"name": "m", "version": 1}})
    assert unexpected.status_code == 422
    both = submit(api, {"stage": "tok_eval", "input": {"name": "m", "version": 1, "alias": "serving"}})
    assert both.status_code == 422
    folder = tmp_path / "tok"
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "tokenizer" / "vocab.txt").write_text("a 0\n")
    (folder / "meta.json").write_text("{}")
    name = f"apitest-{tmp_path.name[-6:].lower().replace('_', '-')}"
    with RegistryClient(registry_url, token=REGISTRY_TOKEN, cache_dir=tmp_path / "cache") as rc:
        version = rc.upload_folder(folder, name, "tokenizer").version
    ok = submit(api, {"stage": "tok_eval", "input": {"name": name, "stage": "tokenizer"}})
    assert ok.status_code == 202, ok.text
    assert ok.json()["input"] == {"name": name, "version": version, "stage": "tokenizer"}
    wrong = submit(api, {"stage": "base_loss", "input": {"name": name, "version": version}})
    assert wrong.status_code == 422 and "tokenizer version" in wrong.text


def test_metrics_series_default_to_the_last_stage_that_trained(api, settings):
    job = submit(api, {"pipeline": "speedrun", "preset": "tiny"}).json()
    events = [
        {"stage": "make_data", "type": "progress", "step": 1, "total": 3, "loss": None},
        {"stage": "base_train", "type": "progress", "step": 1, "loss": 8.0, "lr": 1.0, "tok_per_s": 900.0},
        {"stage": "base_train", "type": "progress", "step": 2, "loss": 7.0, "lr": 0.5, "tok_per_s": 950.0},
        {"stage": "base_train", "type": "eval", "name": "val_bpb", "value": 3.1},
        {"stage": "base_eval", "type": "eval", "name": "core", "value": 0.1},
        {"stage": "mid_train", "type": "progress", "step": 1, "loss": 5.0, "lr": 1.0},
        {"stage": "chat_eval", "type": "eval", "name": "chatcore", "value": 0.02},
    ]
    path = events_path(settings.runs_dir, job["id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    # The job's current stage (make_data) drew no loss curve: the last stage that did is shown.
    body = api.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert body["stage"] == "mid_train" and body["series"] == {"loss": [[1, 5.0]], "lr": [[1, 1.0]]}
    assert body["stages"] == ["base_train", "mid_train"]
    body = api.get(f"/v1/jobs/{job['id']}/metrics", params={"stage": "base_train"}).json()
    assert body["series"]["loss"] == [[1, 8.0], [2, 7.0]] and body["series"]["val_bpb"] == [[2, 3.1]]
    assert api.get(f"/v1/jobs/{job['id']}/metrics", params={"stage": "base_eval"}).json()["series"] == {
        "core": [[0, 0.1]]
    }


def test_curves_follow_the_current_stage_while_it_trains():
    events = [
        {"stage": "base_train", "type": "progress", "step": 1, "loss": 8.0},
        {"stage": "mid_train", "type": "progress", "step": 3, "loss": 6.0, "mfu": 0.2},
        {"stage": "mid_train", "type": "eval", "name": "val_bpb", "value": 2.5},
    ]
    now = curves(events, None, "mid_train")
    assert now.stage == "mid_train" and now.stages == ["base_train", "mid_train"]
    assert now.series == {"loss": [(3, 6.0)], "mfu": [(3, 0.2)], "val_bpb": [(3, 2.5)]}
    assert curves(events, "tok_train", "mid_train").series == {}
    assert curves([], None, "make_data").model_dump() == {"stage": "make_data", "series": {}, "stages": []}


def test_health_ready_and_metrics(api):
    assert api.get("/health").json() == {"status": "ok"}
    ready = api.get("/ready")
    assert ready.status_code == 200, ready.text
    submit(api, {"stage": "make_data", "options": TINY_DATA})
    text = api.get("/metrics").text
    assert "trainer_queue_depth 1.0" in text
    assert 'trainer_jobs{status="queued"} 1.0' in text
    assert "trainer_job_duration_seconds_bucket" in text
    assert api.get("/health", headers={"X-Request-ID": "rid-1"}).headers["X-Request-ID"] == "rid-1"


def test_openapi_lists_the_versioned_paths_only(api):
    paths = api.get("/openapi.json").json()["paths"]
    assert "/v1/jobs" in paths and "/v1/jobs/{job_id}/logs" in paths and "/jobs" not in paths
