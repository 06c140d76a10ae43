"""The web UI against the real services: a registry process (SQLite + local blobs) holding two tiny
random-weight models, an inference process serving from it, a trainer API process on a real Redis,
and the web UI in front of them, driven by Playwright in Debian's Chromium. What only the fake
upstream can stage (model output with XSS payloads, a full queue) stays in test_webui_browser.py."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from conftest import ADMIN_TOKEN, OUTPUT, Proc, free_port, poll, start_webui, wait_healthy
from nanochat.checkpoint import save_checkpoint
from nanochat.engine import Engine
from nanochat.gpt import GPT, GPTConfig
from nanochat.stages.options import PRESETS
from nanochat.tokenizer import Tokenizer
from nanochat_contracts.manifest import write_manifest
from nanochat_testing.data import make_tiny_data
from playwright.sync_api import expect
from registry_client import RegistryClient
from test_webui_browser import last_assistant, open_page, send

pytestmark = pytest.mark.slow

REGISTRY_TOKEN, TRAINER_TOKEN = "registry-secret", "trainer-secret"
TEXT = "The quick brown fox jumps over the lazy dog; 7*3 is 21, and café means coffee. " * 40
MAX_TOKENS = 3000


def noisy_model(tok: Tokenizer, seed: int) -> GPT:
    """A depth-2 model with noise on every weight (a fresh one's zero lm_head says the same for all)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig.from_depth(2, tok.vocab_size, sequence_len=4096))
    model.init_weights()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def greedy_never_ends(tok: Tokenizer, model: GPT) -> bool:
    """The Stop test needs a reply longer than it takes to press Stop: greedy decoding whose
    cycle never reaches <|assistant_end|>."""
    prompt = tok.render_for_completion([{"role": "user", "content": "tell me a long story"}])
    out, _ = Engine(model, tok).generate_batch(prompt, max_tokens=400, temperature=0.0)
    return len(out[0]) - len(prompt) == 400


def spawn(name: str, module: str, env: dict[str, str], url: str, health: str, root: Path) -> Proc:
    with open(root / f"{name}.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", *module.split()], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
    proc = Proc(url, process, env)
    try:
        wait_healthy(f"{url}{health}", process, limit_s=60)
    except RuntimeError:
        proc.stop()
        raise RuntimeError(f"{name} did not start:\n{(root / f'{name}.log').read_text()[-3000:]}") from None
    return proc


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_server):
    root = tmp_path_factory.mktemp("real")
    tok = Tokenizer.train_from_iterator([TEXT], vocab_size=400)
    seed = next(s for s in range(20) if greedy_never_ends(tok, noisy_model(tok, s)))
    procs: dict[str, Proc] = {}
    try:
        port = free_port()
        procs["registry"] = spawn(
            "registry",
            "registry",
            {
                "REGISTRY_PORT": str(port),
                "REGISTRY_DATA_DIR": str(root / "registry"),
                "REGISTRY_WRITE_TOKEN": REGISTRY_TOKEN,
            },
            f"http://127.0.0.1:{port}",
            "/ready",
            root,
        )
        tok.save(root / "tokenizer" / "tokenizer")
        (root / "tokenizer" / "meta.json").write_text(json.dumps({"stage": "tokenizer"}))
        write_manifest(root / "tokenizer")
        with RegistryClient(procs["registry"].url, token=REGISTRY_TOKEN, cache_dir=root / "cache") as rc:
            parent = rc.upload_folder(root / "tokenizer", "nanochat", stage="tokenizer").version
            for stage in ["base", "sft", "rl"]:
                folder = save_checkpoint(root / stage, noisy_model(tok, seed), tok, meta={"stage": stage})
                parent = rc.upload_folder(folder, "nanochat", stage=stage, parent=parent).version
            # Serve the SFT version (v3) until the test moves the alias to RL (v4).
            rc.set_alias("nanochat", "serving", 3)
        port = free_port()
        procs["inference"] = spawn(
            "inference",
            "inference",
            {
                "INFERENCE_PORT": str(port),
                "INFERENCE_REGISTRY_URL": procs["registry"].url,
                "INFERENCE_MODEL_CACHE_DIR": str(root / "models"),
                "INFERENCE_SLOTS": "4",
                "INFERENCE_POLL_INTERVAL_S": "0.5",
                "INFERENCE_CPU_THREADS": "1",
            },
            f"http://127.0.0.1:{port}",
            "/ready",
            root,
        )
        port = free_port()
        procs["trainer"] = spawn(
            "trainer",
            "trainer api",
            {
                "TRAINER_API_PORT": str(port),
                "TRAINER_DATABASE_URL": f"sqlite:///{root / 'trainer.db'}",
                "TRAINER_REDIS_URL": redis_server.url,
                "TRAINER_REGISTRY_URL": procs["registry"].url,
                "TRAINER_WRITE_TOKEN": TRAINER_TOKEN,
                "TRAINER_RUNS_DIR": str(root / "runs"),
                "TRAINER_DATA_DIR": str(root / "data"),
            },
            f"http://127.0.0.1:{port}",
            "/health",
            root,
        )
        procs["webui"] = start_webui(
            None,
            {name: procs[name].url for name in ("inference", "trainer", "registry")},
            WEBUI_TRAINER_TOKEN=TRAINER_TOKEN,
            WEBUI_REGISTRY_TOKEN=REGISTRY_TOKEN,
        )
        yield procs
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


def running_rows(inference_url: str) -> float:
    for line in httpx.get(f"{inference_url}/metrics", timeout=5).text.splitlines():
        if line.startswith("nanochat:num_requests_running "):
            return float(line.split()[1])
    raise AssertionError("inference /metrics has no nanochat:num_requests_running")


def test_real_stream_grows_and_stop_frees_the_inference_row(browser, stack):
    page = open_page(browser, stack["webui"].url)
    expect(page.get_by_test_id("model-badge")).to_have_text("nanochat v3 · sft")
    page.get_by_test_id("settings").locator("summary").click()
    page.fill("[data-setting=temperature]", "0")
    page.fill("[data-setting=max_tokens]", str(MAX_TOKENS))
    page.locator("[data-setting=max_tokens]").dispatch_event("change")
    send(page, "tell me a long story")
    answer = last_assistant(page)
    expect(answer).to_have_attribute("data-state", "streaming")
    poll(lambda: len(answer.locator(".body").inner_text()) > 20)
    seen = len(answer.locator(".body").inner_text())
    page.wait_for_function(
        "([n]) => { const m = [...document.querySelectorAll('[data-role=assistant]')].pop();"
        " return m.dataset.state === 'streaming' && m.querySelector('.body').innerText.length > n + 20; }",
        arg=[seen],
    )
    assert running_rows(stack["inference"].url) == 1
    page.get_by_test_id("stop").click()
    expect(answer).to_have_attribute("data-state", "stopped")
    poll(lambda: running_rows(stack["inference"].url) == 0)
    page.screenshot(path=OUTPUT / "real-chat-stopped-desktop.png")
    assert page.errors == []


def test_real_launch_validation_job_cancel_and_serving_alias(browser, stack):
    page = open_page(browser, f"{stack['webui'].url}/#/launch", token=None)
    page.click("#login-button")
    page.fill("#login-dialog input", ADMIN_TOKEN)
    page.click("#login-dialog button.primary")
    expect(page.locator("#login-button")).to_have_text("Sign out (admin)")
    # The speedrun pipeline: the preset's options, one stage's overridden; the real trainer's
    # 422 names the stage and the field, and lands in that stage's folded section, opened.
    page.get_by_test_id("launch-what").select_option("pipeline:speedrun")
    page.select_option("#opt-preset", label="tiny")
    page.get_by_test_id("stage-options-base_train").locator("summary").click()
    page.fill("#opt-base_train-depth", "5")
    page.get_by_test_id("launch-submit").click()
    expect(page.get_by_test_id("error-base_train-depth")).to_contain_text("power of two")
    page.screenshot(path=OUTPUT / "real-launch-pipeline-desktop.png", full_page=True)
    page.fill("#opt-base_train-depth", "2")
    page.get_by_test_id("launch-submit").click()
    expect(page).to_have_url(re.compile(r"#/jobs/\w+$"))
    pipeline_job = httpx.get(f"{stack['trainer'].url}/v1/jobs").json()["items"][0]
    steps = {step["stage"]: step["options"] for step in pipeline_job["steps"]}
    assert pipeline_job["pipeline"] == "speedrun" and steps["base_train"]["depth"] == 2
    tiny = PRESETS["tiny"]
    # What was left blank is the preset's: in the overridden stage and in the others.
    assert steps["base_train"]["num_iterations"] == tiny["base_train"]["num_iterations"]
    assert steps["mid_train"]["num_iterations"] == tiny["mid_train"]["num_iterations"]
    page.get_by_test_id("cancel").click()
    expect(page.get_by_test_id("status")).to_have_text("cancelled")
    page.goto(f"{stack['webui'].url}/#/launch")
    page.get_by_test_id("launch-what").select_option("base_train")
    # The real trainer's own option schema rejects depth 5 (its head-dim rule); the 422 lands at the field.
    page.fill("#opt-depth", "5")
    page.get_by_test_id("launch-submit").click()
    expect(page.get_by_test_id("error-depth")).to_contain_text("power of two")
    page.fill("#opt-depth", "2")
    page.get_by_test_id("launch-submit").click()
    expect(page).to_have_url(re.compile(r"#/jobs/\w+$"))
    expect(page.get_by_test_id("status")).to_have_text("queued")
    job = httpx.get(f"{stack['trainer'].url}/v1/jobs").json()["items"][0]
    assert job["steps"][0]["stage"] == "base_train" and job["steps"][0]["options"]["depth"] == 2
    page.get_by_test_id("cancel").click()
    expect(page.get_by_test_id("status")).to_have_text("cancelled")
    assert httpx.get(f"{stack['trainer'].url}/v1/jobs/{job['id']}").json()["status"] == "cancelled"

    chat = page.context.new_page()
    chat.goto(stack["webui"].url)
    expect(chat.get_by_test_id("model-badge")).to_have_text("nanochat v3 · sft")
    page.goto(f"{stack['webui'].url}/#/models")
    expect(page.get_by_test_id("lineage")).to_contain_text("base")
    page.locator("[data-testid=version-row][data-version='4']").get_by_test_id("set-serving").click()
    expect(page.locator("[data-testid=version-row][data-version='4']").get_by_test_id("alias")).to_have_text("serving")
    poll(lambda: httpx.get(f"{stack['inference'].url}/ready").json().get("version") == 4, 30)
    expect(chat.get_by_test_id("model-badge")).to_have_text("nanochat v4 · rl", timeout=15_000)
    page.screenshot(path=OUTPUT / "real-models-desktop.png", full_page=True)
    assert page.errors == []


def start_worker(stack, scratch: Path) -> Proc:
    """A worker beside the trainer API, on data make_data wrote where the trainer looks for it."""
    # The worker registers what its stages make: it holds the registry's write token, the API does not.
    env = {**stack["trainer"].env, "TRAINER_REGISTRY_TOKEN": REGISTRY_TOKEN}
    make_tiny_data(Path(env["TRAINER_DATA_DIR"]), scratch)
    with open(scratch / "worker.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "trainer", "worker"], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT
        )
    return Proc("", process)


def submit(stack, body: dict) -> str:
    r = httpx.post(
        f"{stack['trainer'].url}/v1/jobs", headers={"Authorization": f"Bearer {TRAINER_TOKEN}"}, json=body, timeout=30
    )
    assert r.status_code == 202, r.text
    return r.json()["id"]


def ended(stack, job_id: str, limit_s: float = 240) -> dict:
    job = poll(
        lambda: (
            (j := httpx.get(f"{stack['trainer'].url}/v1/jobs/{job_id}").json())["status"]
            in ("succeeded", "failed", "cancelled")
            and j
        ),
        limit_s,
    )
    assert job["status"] == "succeeded", job.get("error")
    return job


def test_real_running_job_page_grows_its_curves_and_log_then_cancels(browser, stack, tmp_path):
    worker = start_worker(stack, tmp_path)
    try:
        options = {
            "depth": 2,
            "max_seq_len": 128,
            "device_batch_size": 2,
            "total_batch_size": 256,
            "num_iterations": 100_000,
            "eval_every": -1,
            "eval_tokens": 256,
            "save_every": -1,
            "core_metric_every": -1,
            "log_every": 1,
        }
        r = httpx.post(
            f"{stack['trainer'].url}/v1/jobs",
            headers={"Authorization": f"Bearer {TRAINER_TOKEN}"},
            json={
                "stage": "base_train",
                "input": {"name": "nanochat", "stage": "tokenizer"},
                "options": options,
                "output_name": "webui-running",
            },
            timeout=30,
        )
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        page = open_page(browser, f"{stack['webui'].url}/#/jobs/{job_id}", token=None)
        expect(page.get_by_test_id("status")).to_have_text("running", timeout=60_000)
        expect(page.get_by_test_id("log-state")).to_have_text("following")
        # The real trainer's attempts, as the job page shows them: one, running on the worker.
        expect(page.get_by_test_id("attempt-row")).to_have_count(1)
        expect(page.get_by_test_id("attempt-row")).to_contain_text("running")
        chart = page.get_by_test_id("chart-loss")
        page.wait_for_function(
            "() => Number(document.querySelector('[data-testid=chart-loss]').dataset.points) >= 3", timeout=120_000
        )
        points = int(chart.get_attribute("data-points"))
        log_length = len(page.get_by_test_id("log").inner_text())
        # The page keeps up with the running job: more points on the curve, more lines in the log.
        page.wait_for_function(
            "([n]) => Number(document.querySelector('[data-testid=chart-loss]').dataset.points) > n",
            arg=[points],
            timeout=60_000,
        )
        page.wait_for_function(
            "([n]) => document.querySelector('[data-testid=log]').innerText.length > n",
            arg=[log_length],
            timeout=60_000,
        )
        assert float(page.get_by_test_id("progress").get_attribute("aria-valuenow")) >= 0
        page.screenshot(path=OUTPUT / "real-job-running-desktop.png", full_page=True)
        page.click("#login-button")
        page.fill("#login-dialog input", ADMIN_TOKEN)
        page.click("#login-dialog button.primary")
        page.get_by_test_id("cancel").click()
        expect(page.get_by_test_id("status")).to_have_text("cancelled", timeout=30_000)
        expect(page.get_by_test_id("log-state")).to_have_text("ended", timeout=30_000)
        assert httpx.get(f"{stack['trainer'].url}/v1/jobs/{job_id}").json()["status"] == "cancelled"
        assert page.errors == []
    finally:
        worker.stop()


def test_real_chat_branches_stats_and_system_prompt(browser, stack):
    page = open_page(browser, stack["webui"].url)
    expect(page.get_by_test_id("model-badge")).to_contain_text("nanochat v")
    page.get_by_test_id("settings").locator("summary").click()
    expect(page.locator("[data-setting=temperature]")).to_have_value("0.8")
    expect(page.locator("[data-setting=top_k]")).to_have_value("50")
    page.fill("[data-setting=max_tokens]", "6")
    page.fill("[data-setting=system]", "Answer briefly.")
    page.locator("[data-setting=system]").dispatch_event("change")
    send(page, "hello")
    answer = last_assistant(page)
    expect(answer).to_have_attribute("data-state", "done", timeout=30_000)
    # The real service's usage chunk gives the count: at most max_tokens (a rate needs two).
    stats = answer.get_by_test_id("stats")
    expect(stats).to_have_text(re.compile(r"^[0-6] tokens?( · [\d.,K]+ tok/s)?$"))
    page.get_by_test_id("regenerate").click()
    expect(last_assistant(page)).to_have_attribute("data-state", "done", timeout=30_000)
    expect(last_assistant(page).get_by_test_id("branch-count")).to_have_text("2/2")
    last_assistant(page).get_by_test_id("branch-prev").click()
    expect(last_assistant(page).get_by_test_id("branch-count")).to_have_text("1/2")
    page.screenshot(path=OUTPUT / "real-chat-branches-desktop.png")
    assert page.errors == []


def test_real_chat_with_a_pinned_version(browser, stack):
    page = open_page(browser, stack["webui"].url)
    expect(page.get_by_test_id("model-badge")).to_contain_text("nanochat v")
    picker = page.get_by_test_id("chat-version")
    expect(picker.locator("option[value='nanochat:2']")).to_have_text("nanochat:2 · base")
    page.get_by_test_id("settings").locator("summary").click()
    page.fill("[data-setting=max_tokens]", "4")
    page.locator("[data-setting=max_tokens]").dispatch_event("change")
    # The base version (v2), which the serving rule never serves, loaded by inference for this chat.
    picker.select_option("nanochat:2")
    send(page, "hello")
    expect(last_assistant(page)).to_have_attribute("data-state", "done", timeout=120_000)
    expect(last_assistant(page).get_by_test_id("answered-by")).to_have_text("nanochat:2")
    served = httpx.get(f"{stack['inference'].url}/v1/models").json()["data"][0]["version"]
    picker.select_option("")
    page.get_by_test_id("regenerate").click()
    expect(last_assistant(page)).to_have_attribute("data-state", "done", timeout=60_000)
    expect(last_assistant(page).get_by_test_id("answered-by")).to_have_text(f"nanochat:{served}")
    assert page.errors == []


SHORT_TRAIN = {
    "depth": 2,
    "max_seq_len": 128,
    "device_batch_size": 2,
    "total_batch_size": 256,
    "num_iterations": 4,
    "eval_every": -1,
    "eval_tokens": 256,
    "save_every": -1,
    "core_metric_every": -1,
    "log_every": 1,
}


def js_pair(point: list[float]) -> str:
    """A [step, value] point as the page writes it (JavaScript's shortest spelling of each number)."""
    return ",".join(str(int(v)) if float(v).is_integer() else repr(float(v)) for v in point)


def test_real_jobs_compared_and_a_report_card(browser, stack, tmp_path):
    worker = start_worker(stack, tmp_path)
    try:
        tokenizer = {"name": "nanochat", "stage": "tokenizer"}
        runs = [
            submit(stack, {"stage": "base_train", "input": tokenizer, "options": {**SHORT_TRAIN, "depth": depth},
                           "output_name": f"webui-d{depth}"})
            for depth in (2, 4)
        ]  # fmt: skip
        # The report stage's title lands in the card's markdown: tags in it must stay text.
        title = 'Card <script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
        report = submit(
            stack, {"stage": "report", "input": {"name": "nanochat", "version": 4}, "options": {"title": title}}
        )
        for job_id in [*runs, report]:
            ended(stack, job_id)

        page = open_page(browser, f"{stack['webui'].url}/#/jobs", token=None)
        for job_id in runs:
            page.locator(f"[data-testid=job-row][data-job='{job_id}']").get_by_test_id("compare-pick").check()
        loss = page.get_by_test_id("compare").get_by_test_id("chart-loss")
        expect(loss).to_have_attribute("data-series", "2")
        for job_id in runs:
            points = httpx.get(f"{stack['trainer'].url}/v1/jobs/{job_id}/metrics").json()["series"]["loss"]
            assert len(points) >= 2
            drawn = loss.locator(f"[data-testid=series][data-label^='{job_id[:12]} base_train']")
            expect(drawn).to_have_attribute("data-points", str(len(points)))
            assert drawn.get_attribute("data-first") == js_pair(points[0])
            assert drawn.get_attribute("data-last") == js_pair(points[-1])

        page.goto(f"{stack['webui'].url}/#/jobs/{report}")
        card = page.get_by_test_id("job-report")
        expect(card.locator("h3").first).to_have_text("Report card · nanochat v4")
        expect(card).to_contain_text(title)
        assert card.locator("script, img[src=x]").count() == 0
        # The plot is drawn from the stages' loss events; these hand-made versions have none, so the
        # card shows exactly the images the registry holds beside it (the fake's test draws one).
        held = httpx.get(f"{stack['registry'].url}/v1/models/nanochat/versions/4").json()["attachments"]
        images = sorted(a["path"] for a in held if a["path"].endswith((".svg", ".png")))
        expect(card.get_by_test_id("report-image")).to_have_count(len(images))
        assert (
            sorted(card.get_by_test_id("report-image").evaluate_all("els => els.map((e) => e.dataset.file)")) == images
        )
        assert "report.md" in [a["path"] for a in held]
        assert page.evaluate("window.__xss") is None
        assert page.errors == []
    finally:
        worker.stop()


# Last: it stops the stack's inference.
def test_real_inference_down_shows_the_banner(browser, stack):
    page = open_page(browser, stack["webui"].url)
    expect(page.get_by_test_id("model-badge")).to_contain_text("nanochat v")
    stack["inference"].stop()
    expect(page.get_by_test_id("banner")).to_contain_text("inference service is down", timeout=15_000)
    send(page, "hello?")
    expect(page.get_by_test_id("chat-error")).to_contain_text("inference service is down")
    assert page.errors == []
