"""The README's web UI screenshots (docs/webui-*.png), taken on a real stack: `make up`'s launcher
(infra/local/up.py: Redis, registry, trainer API and worker, inference, web UI as processes) in a
fresh home, its speedrun cut to a few minutes of CPU, then a second base_train (depth 4 beside the
speedrun's depth 2) to compare with. Playwright in Debian's Chromium shoots each page.

    uv run python services/webui/tests/docs_screenshots.py [--out docs] [--home /tmp/shots]

A home that already holds the finished jobs is reused (the launcher keeps its state), so a rerun
only retakes the pictures.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from nanochat_testing.browser import launch_chromium
from playwright.sync_api import Page, expect, sync_playwright

REPO = Path(__file__).resolve().parents[3]
DESKTOP = {"width": 1280, "height": 800}
_TRAIN = {"max_seq_len": 128, "device_batch_size": 4, "total_batch_size": 512, "save_every": -1}
# The tiny speedrun's data, then every stage cut to minutes on a busy 2-core machine (tiny's own
# base_train ran at ~110 tok/s here: an hour), still long enough for curves.
OPTIONS = {
    "tok_train": {"vocab_size": 4096, "max_chars": 5_000_000},
    "tok_eval": {"max_chars": 20_000},
    "base_train": {**_TRAIN, "depth": 2, "num_iterations": 60, "eval_every": 20, "eval_tokens": 2048},
    "base_loss": {"max_seq_len": 128, "device_batch_size": 4, "split_tokens": 2048},
    "base_eval": {"device_batch_size": 4, "max_per_task": 4},
    "mid_train": {**_TRAIN, "num_iterations": 30, "eval_every": 15, "eval_tokens": 2048},
    "chat_sft": {**_TRAIN, "target_examples_per_step": 4, "num_iterations": 30, "eval_every": 15, "eval_steps": 1},
    "chat_rl": {
        "device_batch_size": 4,
        "examples_per_step": 2,
        "num_samples": 2,
        "max_new_tokens": 16,
        "num_iterations": 4,
        "eval_every": -1,
        "eval_examples": 2,
        "save_every": -1,
    },
    "chat_eval": {"device_batch_size": 4, "max_problems": 2, "max_new_tokens": 16},
}
COMPARED = {**OPTIONS["base_train"], "depth": 4, "num_iterations": 40}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(check, limit_s: float, what: str, every_s: float = 2.0):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise RuntimeError(f"timed out after {limit_s:.0f} s waiting for {what}")


def launch(home: Path, ports: dict[str, int]) -> tuple[subprocess.Popen, Path]:
    out = home.parent / f"{home.name}-launcher.out"
    env = {
        **os.environ,
        "NANOCHAT_HOME": str(home),
        "NANOCHAT_NPROC_PER_NODE": "1",
        "NANOCHAT_OPTIONS": json.dumps(OPTIONS),
        **{f"NANOCHAT_{name.upper()}_PORT": str(port) for name, port in ports.items()},
        "INFERENCE_POLL_INTERVAL_S": "2",
    }
    with open(out, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "infra/local/up.py"], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    wait(lambda: "web UI:" in out.read_text() or proc.poll() is not None, 300, "the launcher's UI line", 1.0)
    if proc.poll() is not None:
        raise RuntimeError(f"the launcher exited:\n{out.read_text()[-3000:]}")
    return proc, out


def finished(trainer: str, job_id: str, limit_s: float, during=None) -> dict:
    def check():
        job = httpx.get(f"{trainer}/v1/jobs/{job_id}", timeout=10).json()
        if during:
            during(job)
        return job["status"] in ("succeeded", "failed", "cancelled") and job

    job = wait(check, limit_s, f"job {job_id}", 5.0)
    if job["status"] != "succeeded":
        raise RuntimeError(f"job {job_id} ended {job['status']}: {job.get('error')}")
    return job


def signed_in(browser, url: str, token: str, dark: bool = False) -> Page:
    context = browser.new_context(viewport=DESKTOP, color_scheme="dark" if dark else "light")
    assert context.request.post(f"{url.split('#')[0].rstrip('/')}/api/session", data={"token": token}).ok
    page = context.new_page()
    page.goto(url)
    expect(page.locator("body")).to_have_attribute("data-ready", "true")
    return page


def ask(page: Page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    expect(page.locator("[data-role=assistant]").last).to_have_attribute("data-state", "done", timeout=120_000)


def shoot_chat(browser, url: str, token: str, out: Path, pinned: str) -> None:
    page = signed_in(browser, url, token)
    page.get_by_test_id("settings").locator("summary").click()
    page.fill("[data-setting=max_tokens]", "48")
    page.locator("[data-setting=max_tokens]").dispatch_event("change")
    page.get_by_test_id("settings").locator("summary").click()
    ask(page, "Hello! Who are you?")
    ask(page, "What is 7*3?")
    page.screenshot(path=out / "webui-chat.png")
    page.get_by_test_id("regenerate").click()
    expect(page.locator("[data-role=assistant]").last).to_have_attribute("data-state", "done", timeout=120_000)
    expect(page.locator("[data-role=assistant]").last.get_by_test_id("branch-count")).to_have_text("2/2")
    page.screenshot(path=out / "webui-chat-branches.png")
    page.keyboard.press("Control+Shift+O")
    page.get_by_test_id("chat-version").select_option(pinned)
    ask(page, "Hello! Who are you?")
    answered = page.locator("[data-role=assistant]").last.get_by_test_id("answered-by").inner_text()
    if answered != pinned:
        print(f"warning: the pinned chat was answered by {answered!r}, not {pinned!r}", file=sys.stderr)
    page.get_by_test_id("chat-version").focus()
    page.screenshot(path=out / "webui-chat-pinned.png")
    page.context.close()


def shoot_dashboard(browser, url: str, token: str, out: Path, speedrun: str, compared: str) -> None:
    page = signed_in(browser, f"{url}/#/jobs/{speedrun}", token)
    expect(page.get_by_test_id("status")).to_have_text("succeeded")
    expect(page.get_by_test_id("report-image")).to_have_count(1, timeout=30_000)
    page.wait_for_function("() => document.querySelector('[data-testid=report-image]').naturalWidth > 0")
    page.screenshot(path=out / "webui-job.png")
    dark = signed_in(browser, f"{url}/#/jobs/{speedrun}", token, dark=True)
    expect(dark.get_by_test_id("chart-loss")).not_to_have_attribute("data-points", "0")
    dark.get_by_test_id("curve-stage").select_option("base_train")
    expect(dark.get_by_test_id("chart-val_bpb")).not_to_have_attribute("data-points", "0")
    dark.locator(".charts").first.scroll_into_view_if_needed()
    dark.screenshot(path=out / "webui-job-dark.png")
    dark.context.close()
    page.get_by_test_id("job-report").scroll_into_view_if_needed()
    page.get_by_test_id("report-image").scroll_into_view_if_needed()
    page.screenshot(path=out / "webui-job-report.png")
    page.goto(f"{url}/#/jobs")
    for job in (speedrun, compared):
        page.locator(f"[data-testid=job-row][data-job='{job}']").get_by_test_id("compare-pick").check()
    expect(page.get_by_test_id("compare").get_by_test_id("chart-loss")).to_have_attribute("data-series", "2")
    page.screenshot(path=out / "webui-jobs-compare.png", full_page=True)
    page.goto(f"{url}/#/models")
    expect(page.get_by_test_id("lineage-node").first).to_be_visible()
    page.screenshot(path=out / "webui-models.png")
    row = page.locator("[data-testid=version-row]").nth(1)
    row.get_by_test_id("alias-add").click()
    row.get_by_test_id("alias-input").fill("candidate")
    row.get_by_test_id("alias-input").press("Enter")
    expect(row.get_by_test_id("alias")).to_contain_text(["candidate"])
    page.screenshot(path=out / "webui-models-aliases.png")
    row.get_by_role("button", name="Remove alias candidate").click()
    page.context.close()


def submit_compared(trainer: str, token: str, name: str) -> str:
    r = httpx.post(
        f"{trainer}/v1/jobs",
        headers={"Authorization": f"Bearer {token}"},
        json={"stage": "base_train", "input": {"name": name, "stage": "tokenizer"}, "options": COMPARED,
              "output_name": f"{name}-d4"},
        timeout=30,
    )  # fmt: skip
    r.raise_for_status()
    return r.json()["id"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--home", type=Path, default=Path("/tmp/nanochat-shots"))
    args = parser.parse_args()
    ports = {name: free_port() for name in ("webui", "inference", "trainer", "registry", "redis")}
    proc, out = launch(args.home, ports)
    try:
        tokens = json.loads((args.home / "tokens.json").read_text())
        trainer, webui = f"http://127.0.0.1:{ports['trainer']}", f"http://127.0.0.1:{ports['webui']}"
        jobs = httpx.get(f"{trainer}/v1/jobs", timeout=10).json()["items"]
        runs = [j for j in jobs if j.get("pipeline") == "speedrun" and j["status"] != "cancelled"]
        speedrun = max(runs, key=lambda j: j["created_at"])["id"]
        compared = next((j["id"] for j in jobs if j.get("output_name") == "nanochat-d4"), None)
        with sync_playwright() as p:
            browser = launch_chromium(p)

            shot_mid_way = []

            def mid_way(job: dict) -> None:
                # The pipeline mid-way: its steps, the versions made so far, the curves growing.
                if job["current_stage"] == "mid_train" and not shot_mid_way:
                    shot_mid_way.append(job["id"])
                    page = signed_in(browser, f"{webui}/#/jobs/{job['id']}", tokens["admin"])
                    expect(page.get_by_test_id("chart-loss")).not_to_have_attribute("data-points", "0")
                    page.screenshot(path=args.out / "webui-job-steps.png")
                    page.context.close()

            job = finished(trainer, speedrun, 3600, mid_way)
            compared = compared or submit_compared(trainer, tokens["trainer"], "nanochat")
            finished(trainer, compared, 1800)
            sft = next(p["version"] for p in job["produced"] if p["stage"] == "sft")
            wait(lambda: httpx.get(f"http://127.0.0.1:{ports['inference']}/ready", timeout=5).status_code == 200, 300,
                 "inference to serve")  # fmt: skip
            shoot_chat(browser, webui, tokens["admin"], args.out, f"nanochat:{sft}")
            shoot_dashboard(browser, webui, tokens["admin"], args.out, speedrun, compared)
            browser.close()
        print(f"screenshots in {args.out}; launcher output in {out}")
        return 0
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
