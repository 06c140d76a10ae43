"""The whole stack end to end, started the way `make up` starts it (slow: several minutes).

    uv run pytest tests/test_e2e.py

`infra/local/up.py` runs as a subprocess with NANOCHAT_HOME in a temporary folder and free ports;
NANOCHAT_OPTIONS shrinks the speedrun it submits to a short chain that still runs every stage
(a few steps each, evals capped to a few items). The tests then follow the job to success, check
the registry's versions (every stage, lineage, hashes), the served model, chat through the
`openai` SDK and through the web UI in Chromium, and two faults: inference killed mid-stream
(the launcher restarts it and it serves the same version) and the trainer worker killed mid-job
(the reaper fails the job within the shortened heartbeat limit).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from nanochat_testing.browser import launch_chromium
from playwright.sync_api import expect, sync_playwright
from registry_client import RegistryClient

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
MODEL = "nanochat"
# Screenshots of the web UI on the real stack (ignored by git; the README's pictures come from here).
SHOTS = Path(__file__).parent / "output"
CHAIN = ["tokenizer", "base", "mid", "sft", "rl"]
HEARTBEAT_LIMIT_S = 6.0
# Every stage of the speedrun, each cut to seconds on a CPU. The model keeps 256 positions so a
# streamed answer lasts long enough to be cut off mid-way.
_TRAIN = {
    "max_seq_len": 256,
    "device_batch_size": 2,
    "total_batch_size": 512,
    "eval_every": -1,
    "eval_tokens": 512,
    "save_every": -1,
}
FAST_OPTIONS = {
    "make_data": {
        "source": "synthetic",
        "synthetic_docs": 300,
        "docs_per_shard": 256,
        "val_docs": 256,
        "chat_train": 100,
        "chat_test": 20,
        "math_train": 50,
        "math_test": 10,
        "mc_train": 50,
        "mc_test": 10,
        "identity_train": 30,
        "identity_test": 10,
        "core_items": 8,
    },
    "tok_train": {"vocab_size": 512, "max_chars": 300_000},
    "tok_eval": {"max_chars": 5000},
    "base_train": {**_TRAIN, "depth": 2, "num_iterations": 4},
    "base_loss": {"max_seq_len": 256, "device_batch_size": 2, "split_tokens": 512},
    "base_eval": {"device_batch_size": 4, "max_per_task": 4},
    "mid_train": {**_TRAIN, "num_iterations": 3},
    "chat_sft": {**_TRAIN, "target_examples_per_step": 4, "num_iterations": 3, "eval_steps": 1},
    "chat_rl": {
        "device_batch_size": 4,
        "examples_per_step": 2,
        "num_samples": 2,
        "max_new_tokens": 8,
        "num_iterations": 2,
        "eval_every": -1,
        "eval_examples": 2,
        "save_every": -1,
    },
    "chat_eval": {"device_batch_size": 4, "max_problems": 2, "max_new_tokens": 8},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def poll(check, timeout_s: float, what: str, interval_s: float = 0.5):
    """check()'s first truthy value; a failure naming `what` when none comes within timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Stack:
    proc: subprocess.Popen | None
    out: Path
    home: Path
    ports: dict[str, int]
    tokens: dict[str, str]
    env: dict[str, str]

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def output(self) -> str:
        return self.out.read_text()

    def pid(self, service: str) -> int:
        """The newest process the launcher started for `service` (it restarts dead ones)."""
        found = re.findall(rf"started {re.escape(service)}\s+pid (\d+)", self.output())
        assert found, f"the launcher never started {service}:\n{self.output()}"
        return int(found[-1])

    def all_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"started \S+\s+pid (\d+)", self.output())]

    @property
    def registry_read(self) -> dict[str, str]:
        """The header of a registry read: `make up`'s registry requires its read token."""
        return {"Authorization": f"Bearer {self.tokens['registry_read']}"}

    def job(self, job_id: str) -> dict:
        r = httpx.get(f"{self.url('trainer')}/v1/jobs/{job_id}", timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def logs(self, name: str, chars: int = 3000) -> str:
        path = self.home / "logs" / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    ports = {s: free_port() for s in ("webui", "inference", "trainer", "registry", "redis")}
    env = {
        **os.environ,
        "NANOCHAT_HOME": str(tmp / "home"),
        "NANOCHAT_NPROC_PER_NODE": "1",
        "NANOCHAT_OPTIONS": json.dumps(FAST_OPTIONS),
        **{f"NANOCHAT_{s.upper()}_PORT": str(p) for s, p in ports.items()},
        "TRAINER_HEARTBEAT_LIMIT": str(HEARTBEAT_LIMIT_S),
        "TRAINER_HEARTBEAT_INTERVAL": "1",
        # The heartbeat limit must outlast two busy timeouts (trainer.settings): 2 x (2 + 1) = 6.
        "TRAINER_DB_BUSY_TIMEOUT": "2",
        "TRAINER_REAP_INTERVAL": "1",
        "INFERENCE_POLL_INTERVAL_S": "2",
    }
    stack = Stack(None, tmp / "launcher.out", tmp / "home", ports, {}, env)
    try:
        launch(stack)
        stack.tokens = json.loads((stack.home / "tokens.json").read_text())
        yield stack
    finally:
        code, left = ctrl_c(stack)
    assert code == 0, f"the launcher ended with {code}:\n{stack.output()[-3000:]}"
    assert left == [], f"processes left after SIGINT: {left}"


def launch(stack: Stack) -> None:
    """Start `infra/local/up.py` as `make up` does and wait for its UI line."""
    with open(stack.out, "wb") as f:
        stack.proc = subprocess.Popen(
            [sys.executable, "infra/local/up.py"],
            cwd=REPO,
            env=stack.env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    poll(lambda: "web UI:" in stack.output() or stack.proc.poll() is not None, 180, "the launcher's UI line")
    assert stack.proc.poll() is None, f"the launcher exited with {stack.proc.returncode}:\n{stack.output()}"


def ctrl_c(stack: Stack) -> tuple[int | None, list[int]]:
    """Ctrl-C (SIGINT) to the launcher; its exit code and the service processes it left alive."""
    pids = stack.all_pids()
    if stack.proc.poll() is None:
        os.killpg(stack.proc.pid, signal.SIGINT)
    try:
        code = stack.proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(stack.proc.pid, signal.SIGKILL)
        code = None
    left = [p for p in pids if alive(p)]
    for p in left:
        os.killpg(p, signal.SIGKILL)
    return code, left


@pytest.fixture(scope="module")
def speedrun(stack) -> dict:
    """The job the launcher submitted, followed until it ends; it must succeed."""
    found = re.search(r"submitted the \S+ speedrun as job (\w+)", stack.output())
    assert found, f"the launcher submitted no speedrun:\n{stack.output()}"
    job_id = found.group(1)
    job = poll(
        lambda: (j := stack.job(job_id))["status"] in ("succeeded", "failed", "cancelled") and j,
        480,
        f"speedrun job {job_id}",
        interval_s=2,
    )
    assert job["status"] == "succeeded", (
        f"speedrun {job['status']} at {job['current_stage']} (step {job['step_index'] + 1}/{len(job['steps'])}): "
        f"{job['error']}\n{job['log_tail']}\nworker log:\n{stack.logs('trainer-worker')}"
    )
    return job


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_speedrun_job_runs_every_stage(speedrun):
    assert [s["stage"] for s in speedrun["steps"]][:4] == ["make_data", "tok_train", "tok_eval", "base_train"]
    assert speedrun["steps"][3]["options"]["num_iterations"] == FAST_OPTIONS["base_train"]["num_iterations"]
    assert speedrun["progress"] == 100.0
    assert [p["stage"] for p in speedrun["produced"]] == CHAIN


def test_registry_holds_the_chain_with_lineage_and_verified_hashes(stack, speedrun, tmp_path):
    produced = {p["stage"]: p["version"] for p in speedrun["produced"]}
    with RegistryClient(stack.url("registry"), token=stack.tokens["registry_read"], cache_dir=tmp_path) as client:
        lineage = client.lineage(MODEL, produced["rl"])
        chain = [lineage["version"]] + lineage["parents"]
        assert [(v["stage"], v["version"]) for v in chain] == [(s, produced[s]) for s in reversed(CHAIN)]
        for stage, version in produced.items():
            info = client.get_version(MODEL, version)
            assert info.state == "ready" and info.stage == stage and info.job_id == speedrun["id"]
            folder = client.download(MODEL, version=version)
            assert info.files, f"{stage} v{version} has no files"
            for f in info.files:
                assert sha256(folder / f.path) == f.sha256, f"{stage} v{version}: {f.path} differs from its record"
            for f in info.attachments:
                client.read_attachment(MODEL, version, f.path)


def test_report_card_covers_the_whole_lineage(stack, speedrun, tmp_path):
    """The report stage reads every ancestor and the evals patched onto each (not just the RL folder)."""
    rl = next(p["version"] for p in speedrun["produced"] if p["stage"] == "rl")
    with RegistryClient(stack.url("registry"), token=stack.tokens["registry_read"], cache_dir=tmp_path) as client:
        info = client.get_version(MODEL, rl)
        assert {"report.md", "loss.svg"} <= {a.path for a in info.attachments}
        report = client.read_attachment(MODEL, rl, "report.md").decode()
        assert client.read_attachment(MODEL, rl, "loss.svg").startswith(b"<svg ")
    assert "| Metric | BASE | MID | SFT | RL |" in report
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
        for line in report.splitlines()
        if line.startswith("| ") and line.count("|") == 6
    }
    # make_data's bundle is no real CORE bundle, and the card says so in the row's name.
    core = rows["CORE (offline bundle, 4 items per task, not comparable to the real CORE)"]
    assert core[0], f"no base CORE in the report:\n{report}"
    assert all(rows["ARC-Easy"][1:]), f"ARC-Easy missing for mid/sft/rl:\n{report}"
    assert "## Stage times" in report and "| base_train |" in report
    # The trainer names every version the report reads, one --input-version each (DESIGN.md).
    log = httpx.get(f"{stack.url('trainer')}/v1/jobs/{speedrun['id']}/logs", timeout=30).text
    command = next(line for line in log.splitlines() if "[trainer] $" in line and "nanochat.stages.report" in line)
    for made in speedrun["produced"]:
        assert f"--input-version {MODEL}:{made['version']}" in command, (made, command)


def wait_served(stack, version: int) -> dict:
    def served():
        try:
            r = httpx.get(f"{stack.url('inference')}/ready", timeout=5)
        except httpx.TransportError:  # a restarted inference is not listening yet
            return False
        return r.status_code == 200 and r.json().get("version") == version and r.json()

    return poll(served, 120, f"inference to serve v{version}\n{stack.logs('inference')}")


def test_inference_switched_to_the_new_version(stack, speedrun):
    rl = next(p["version"] for p in speedrun["produced"] if p["stage"] == "rl")
    wait_served(stack, rl)
    models = httpx.get(f"{stack.url('inference')}/v1/models", timeout=5).json()["data"]
    assert [(m["id"], m["version"], m["stage"]) for m in models] == [(MODEL, rl, "rl")]


def test_chat_through_the_openai_sdk(stack, speedrun):
    client = openai.OpenAI(base_url=f"{stack.url('inference')}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens >= 1 and reply.usage.prompt_tokens > 1
    assert isinstance(reply.choices[0].message.content, str)

    chunks = list(
        client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, stream=True)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finished = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finished == [reply.choices[0].finish_reason]
    # Greedy decoding: the stream spells the same answer as the plain call.
    assert text == reply.choices[0].message.content


def test_chat_in_the_web_ui(stack, speedrun):
    rl = next(p["version"] for p in speedrun["produced"] if p["stage"] == "rl")
    wait_served(stack, rl)
    with sync_playwright() as p:
        browser = launch_chromium(p)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(stack.url("webui"))
            expect(page.locator("body")).to_have_attribute("data-ready", "true")
            expect(page.get_by_test_id("model-badge")).to_contain_text(f"v{rl}")
            page.fill("#prompt", "Hello, who are you?")
            page.press("#prompt", "Enter")
            answer = page.locator("[data-testid=message][data-role=assistant]").last
            expect(answer).to_have_attribute("data-state", "done", timeout=60_000)
            assert answer.locator(".body").inner_text().strip()
            SHOTS.mkdir(exist_ok=True)
            page.set_viewport_size({"width": 1280, "height": 800})
            page.screenshot(path=SHOTS / "e2e-chat.png")
            page.goto(f"{stack.url('webui')}/#/jobs/{speedrun['id']}")
            expect(page.get_by_test_id("log-state")).to_be_visible()
            expect(page.get_by_test_id("status").first).to_have_text("succeeded")
            page.screenshot(path=SHOTS / "e2e-job.png", full_page=True)
            assert errors == []
        finally:
            browser.close()


def test_inference_killed_mid_stream_then_restarted_serves_the_same_version(stack, speedrun):
    rl = next(p["version"] for p in speedrun["produced"] if p["stage"] == "rl")
    wait_served(stack, rl)
    before = stack.pid("inference")
    client = openai.OpenAI(base_url=f"{stack.url('inference')}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Tell me a story."}],
        max_tokens=200,
        temperature=0,
        stream=True,
    )
    received = []
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        for chunk in stream:
            received.append(chunk)
            assert not (chunk.choices and chunk.choices[0].finish_reason), "the answer ended before the kill"
            if len(received) == 2:
                os.killpg(before, signal.SIGKILL)
    assert len(received) >= 2
    # The launcher restarts the dead service, which resolves and loads the same version again.
    after = poll(lambda: (p := stack.pid("inference")) != before and p, 30, "the launcher to restart inference")
    assert alive(after) and not alive(before)
    wait_served(stack, rl)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
    assert reply.usage.completion_tokens >= 1


def test_worker_killed_mid_job_fails_the_job_within_the_heartbeat_limit(stack):
    # Any run that made a tokenizer will do: the job trains on it for far longer than the test waits.
    poll(
        lambda: (
            httpx.get(
                f"{stack.url('registry')}/v1/resolve/{MODEL}",
                params={"stage": "tokenizer"},
                headers=stack.registry_read,
                timeout=5,
            ).status_code
            == 200
        ),
        300,
        "a tokenizer version",
    )
    poll(
        lambda: (
            not httpx.get(f"{stack.url('trainer')}/v1/jobs", params={"status": "running"}, timeout=5).json()["items"]
        ),
        480,
        "the running job to end (one worker)",
        interval_s=2,
    )
    body = {
        "stage": "base_train",
        "input": {"name": MODEL, "stage": "tokenizer"},
        "options": {**FAST_OPTIONS["base_train"], "num_iterations": 100_000, "log_every": 1},
        "output_name": "e2e-killed",
        "resources": {"nproc_per_node": 1, "nnodes": 1},
        # One attempt: the restarted worker would otherwise retry it (tests/faults covers retries).
        "max_attempts": 1,
    }
    r = httpx.post(
        f"{stack.url('trainer')}/v1/jobs",
        json=body,
        timeout=30,
        headers={"Authorization": f"Bearer {stack.tokens['trainer']}"},
    )
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    running = poll(
        lambda: (
            (j := stack.job(job_id))["status"] == "running" and (j["step"] or 0) >= 1 and j["nodes"][0]["pgid"] and j
        ),
        120,
        "the job to train a step",
    )
    stage_group = running["nodes"][0]["pgid"]
    os.killpg(stack.pid("trainer-worker"), signal.SIGKILL)

    ended = poll(
        lambda: (j := stack.job(job_id))["status"] != "running" and j,
        HEARTBEAT_LIMIT_S + 20,
        "the reaper to end the job",
    )
    assert ended["status"] == "failed", ended
    assert ended["error"]
    # The stage's own processes went with it: nothing keeps training for a dead job.
    poll(lambda: not group_alive(stage_group), 20, f"the stage's process group {stage_group} to be gone")


def test_ctrl_c_mid_job_then_a_second_make_up_reuses_everything_and_resumes_the_job(stack, speedrun):
    """Ctrl-C while a training job runs: everything stops cleanly, the worker queues the job
    again; the second launch reuses the state (no new speedrun, same versions) and the job goes
    on from its resumable checkpoint."""
    versions = httpx.get(
        f"{stack.url('registry')}/v1/models/{MODEL}/versions", headers=stack.registry_read, timeout=10
    ).json()
    poll(
        lambda: (
            not httpx.get(f"{stack.url('trainer')}/v1/jobs", params={"status": "running"}, timeout=5).json()["items"]
        ),
        120,
        "no running job",
        interval_s=1,
    )
    body = {
        "stage": "base_train",
        "input": {"name": MODEL, "stage": "tokenizer"},
        "options": {**FAST_OPTIONS["base_train"], "num_iterations": 100_000, "save_every": 3, "log_every": 1},
        "output_name": "e2e-resumed",
        "resources": {"nproc_per_node": 1, "nnodes": 1},
    }
    auth = {"Authorization": f"Bearer {stack.tokens['trainer']}"}
    r = httpx.post(f"{stack.url('trainer')}/v1/jobs", json=body, timeout=30, headers=auth)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    resume = stack.home / "runs" / "jobs" / job_id / "steps" / "00-base_train.resume"
    poll(lambda: (resume / "manifest.json").is_file(), 120, f"a resumable checkpoint at {resume}")
    code, left = ctrl_c(stack)
    assert code == 0 and left == [], (code, left, stack.output()[-3000:])

    first_output = stack.output()
    launch(stack)
    assert stack.output() != first_output
    assert re.search(rf"serving {MODEL} v\d+ \(rl\)", stack.output()), stack.output()
    assert "submitted" not in stack.output()
    poll(
        lambda: (j := stack.job(job_id))["status"] == "running" and j["attempt"] == 2 and (j["step"] or 0) > 3 and j,
        120,
        "the job to run again",
    )
    log = httpx.get(f"{stack.url('trainer')}/v1/jobs/{job_id}/logs", timeout=30).text
    commands = [line for line in log.splitlines() if line.startswith("[trainer] $ ")]
    assert len(commands) == 2 and commands[1].endswith("--resume"), commands
    again = httpx.get(
        f"{stack.url('registry')}/v1/models/{MODEL}/versions", headers=stack.registry_read, timeout=10
    ).json()
    assert [v["version"] for v in again["items"]] == [v["version"] for v in versions["items"]]
    assert httpx.post(f"{stack.url('trainer')}/v1/jobs/{job_id}/cancel", timeout=30, headers=auth).status_code in (
        200,
        202,
    )
    poll(lambda: stack.job(job_id)["status"] == "cancelled", 60, "the cancel")
