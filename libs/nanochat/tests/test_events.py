"""The event contract (nanochat_contracts.events) and its writer (nanochat.stages.events): the JSON-lines
schema, emitter, tolerant parser, and real stage streams."""

import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from nanochat.stages.events import EventEmitter
from nanochat_contracts.events import Finished, Progress, parse_event_line, parse_events


def test_emitter_writes_one_flushed_object_per_line_with_lineage():
    out = io.StringIO()
    emitter = EventEmitter("base_train", job_id="job-7", input_versions=["nanochat:3"], stream=out)
    emitter.started({"depth": 4})
    emitter.progress(step=5, total=10, loss=2.5, lr=0.02, tok_per_s=1000.0, mfu=0.1, eta_s=3.0)
    emitter.eval("val/bpb", 1.23, version="nanochat:3")
    emitter.checkpoint("runs/x", step=5)
    emitter.finished([{"path": "runs/x", "registry_stage": "base"}], {"val/bpb": 1.2})
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["started", "progress", "eval", "checkpoint", "finished"]
    for line in lines:
        obj = json.loads(line)
        assert obj["job_id"] == "job-7" and obj["input_versions"] == ["nanochat:3"] and obj["stage"] == "base_train"
    events = list(parse_events(lines))
    assert isinstance(events[1], Progress) and events[1].tok_per_s == 1000.0
    assert isinstance(events[-1], Finished) and events[-1].outputs[0].registry_stage == "base"


def test_only_rank_zero_emits(monkeypatch):
    monkeypatch.setenv("RANK", "1")
    out = io.StringIO()
    EventEmitter("base_train", stream=out).error("boom")
    assert out.getvalue() == ""


def test_parser_skips_noise_and_invalid_events():
    lines = [
        "warning: something",
        "",
        "{not json",
        json.dumps({"type": "progress", "stage": "s"}),
        json.dumps({"type": "teleport", "stage": "s"}),
        json.dumps({"type": "progress", "stage": "s", "step": 3}),
    ]
    assert parse_event_line(lines[0]) is None
    events = list(parse_events(lines))
    assert len(events) == 1 and events[0].step == 3


def test_bad_registry_stage_is_rejected_by_the_emitter():
    with pytest.raises(ValueError):
        EventEmitter("x", stream=io.StringIO()).finished([{"path": "p", "registry_stage": "weights"}])


def _run(args, **kw):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=120, **kw)


def test_real_stage_stream_ends_with_finished_and_failure_with_error(tmp_path):
    ok = _run(
        [
            "nanochat.stages.make_data",
            "--data-dir",
            str(tmp_path / "d"),
            "--job-id",
            "j1",
            "--input-version",
            "seed:1",
            "--source",
            "synthetic",
            "--synthetic-docs",
            "1500",
            "--val-docs",
            "200",
            "--chat-train",
            "50",
            "--chat-test",
            "10",
            "--math-train",
            "50",
            "--math-test",
            "10",
            "--mc-train",
            "40",
            "--mc-test",
            "10",
            "--identity-train",
            "20",
            "--identity-test",
            "10",
            "--core-items",
            "10",
        ]
    )
    assert ok.returncode == 0, ok.stderr
    events = list(parse_events(ok.stdout.splitlines()))
    assert events[0].type == "started" and events[-1].type == "finished"
    assert all(e.job_id == "j1" and e.input_versions == ["seed:1"] for e in events)
    again = _run(["nanochat.stages.make_data", "--data-dir", str(tmp_path / "d"), "--source", "synthetic"])
    assert again.returncode == 1
    last = list(parse_events(again.stdout.splitlines()))[-1]
    assert last.type == "error" and "--overwrite" in last.message


def test_sigterm_ends_with_error_and_leaves_no_half_folder(tmp_path):
    data = tmp_path / "d"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nanochat.stages.make_data",
            "--data-dir",
            str(data),
            "--source",
            "synthetic",
            "--synthetic-docs",
            "3000000",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    first = proc.stdout.readline()
    assert json.loads(first)["type"] == "started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stdout.read()
    assert proc.wait(timeout=60) == 143
    last = list(parse_events(rest.splitlines()))[-1]
    assert last.type == "error" and "SIGTERM" in last.message
    assert os.listdir(data) == []
