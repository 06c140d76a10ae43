"""The model stages as the trainer runs them, as separate processes on a tiny model: SIGTERM leaves
no half folder, `--resume` reaches the weights of an uninterrupted run (CPU fp32, <= 1e-5), and a
short chain (base under torchrun x2 -> evals -> mid -> SFT -> RL -> report) lowers the bpb."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
from nanochat.stages.train_loop import BASE_PROMPTS
from nanochat_contracts.events import parse_event_line, parse_events
from nanochat_contracts.manifest import verify_manifest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
MODEL = ["--depth", "2", "--max-seq-len", "32", "--device-batch-size", "2", "--total-batch-size", "64"]
STAGE_OPTIONS = {
    "base_train": MODEL + ["--eval-tokens", "256", "--core-metric-every", "-1"],
    "mid_train": [
        "--max-seq-len",
        "32",
        "--device-batch-size",
        "2",
        "--total-batch-size",
        "64",
        "--eval-tokens",
        "256",
    ],
    "chat_sft": [
        "--max-seq-len",
        "64",
        "--device-batch-size",
        "2",
        "--target-examples-per-step",
        "4",
        "--eval-steps",
        "2",
    ],
}


def run(stage, *args, torchrun=False, timeout=300):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        if torchrun
        else [sys.executable]
    )
    proc = subprocess.run(
        [*launcher, "-m", f"nanochat.stages.{stage}", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )
    events = list(parse_events(proc.stdout.splitlines()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert events[0].type == "started" and events[-1].type == "finished"
    return events


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    run(
        "make_data",
        "--data-dir",
        str(data),
        "--chat-train",
        "60",
        "--chat-test",
        "10",
        "--math-train",
        "30",
        "--math-test",
        "6",
        "--mc-train",
        "30",
        "--mc-test",
        "6",
        "--identity-train",
        "20",
        "--identity-test",
        "6",
        "--core-items",
        "8",
    )
    run(
        "tok_train",
        "--data-dir",
        str(data),
        "--out",
        str(root / "tok"),
        "--vocab-size",
        "1024",
        "--max-chars",
        "2000000",
    )
    return root


def stage_args(stage, root, init_from, out, steps, save_every):
    return [
        *STAGE_OPTIONS[stage],
        "--data-dir",
        str(root / "data"),
        "--init-from",
        str(init_from),
        "--out",
        str(out),
        "--num-iterations",
        str(steps),
        "--save-every",
        str(save_every),
        "--eval-every",
        "-1",
        "--seed",
        "7",
    ]


@pytest.fixture(scope="module")
def base_ckpt(workdir):
    out = workdir / "base_full"
    run("base_train", *stage_args("base_train", workdir, workdir / "tok", out, 40, -1))
    return out


def interrupt_after_checkpoint(stage, args):
    """Start a stage, SIGTERM it right after its first resumable checkpoint; return its events and exit code."""
    proc = subprocess.Popen(
        [sys.executable, "-m", f"nanochat.stages.{stage}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=ENV,
    )
    events = []
    for line in proc.stdout:
        event = parse_event_line(line)
        if event is None:
            continue
        events.append(event)
        if event.type == "checkpoint":
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    events += list(parse_events(rest.splitlines()))
    return events, proc.returncode


@pytest.mark.parametrize("stage", ["base_train", "mid_train", "chat_sft"])
def test_sigterm_leaves_no_half_folder_and_resume_equals_an_uninterrupted_run(stage, workdir, base_ckpt):
    init = workdir / "tok" if stage == "base_train" else base_ckpt
    steps = 40
    full = workdir / f"{stage}_full"
    if stage != "base_train":
        run(stage, *stage_args(stage, workdir, init, full, steps, -1))
    else:
        full = base_ckpt
    out = workdir / f"{stage}_cut"
    events, code = interrupt_after_checkpoint(stage, stage_args(stage, workdir, init, out, steps, 4))
    assert code == 143, [e.type for e in events]
    assert events[-1].type == "error" and "SIGTERM" in events[-1].message
    assert not out.exists()
    assert not [p for p in workdir.iterdir() if p.name.startswith(f".{out.name}")]  # no temp or staging folder left
    resume = out.with_name(out.name + ".resume")
    verify_manifest(resume)
    assert sorted(p.name for p in (resume / "optim").iterdir()) == ["rank0.json", "rank0.safetensors"]

    finished = run(stage, *stage_args(stage, workdir, init, out, steps, 4), "--resume")[-1]
    assert [o.registry_stage for o in finished.outputs] == [
        {"base_train": "base", "mid_train": "mid", "chat_sft": "sft"}[stage]
    ]
    assert not resume.exists()
    a, b = load_file(str(full / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5


def test_short_chain_lowers_bpb_and_writes_the_report(workdir):
    root, data = workdir, str(workdir / "data")
    base = root / "chain_base"
    events = run(
        "base_train",
        *MODEL,
        "--device-batch-size",
        "4",
        "--total-batch-size",
        "256",
        "--data-dir",
        data,
        "--init-from",
        str(root / "tok"),
        "--out",
        str(base),
        "--num-iterations",
        "60",
        "--eval-every",
        "30",
        "--eval-tokens",
        "512",
        "--core-metric-every",
        "-1",
        "--job-id",
        "job-7",
        "--input-version",
        "tok:1",
        torchrun=True,
    )
    metrics = events[-1].metrics
    assert metrics["val_bpb"] < 0.9 * metrics["val_bpb_step0"]
    assert [o.model_dump() for o in events[-1].outputs] == [{"path": str(base), "registry_stage": "base"}]
    progress = [e for e in events if e.type == "progress"]
    assert progress and all(e.tok_per_s > 0 and e.eta_s >= 0 and e.total == 60 for e in progress)
    assert all(e.job_id == "job-7" and e.input_versions == ["tok:1"] for e in events)
    verify_manifest(base)
    trained = json.loads((base / "meta.json").read_text())["samples"]
    assert trained["step"] == 60 and [x["prompt"] for x in trained["samples"]] == list(BASE_PROMPTS)

    loss = run(
        "base_loss",
        "--data-dir",
        data,
        "--init-from",
        str(base),
        "--max-seq-len",
        "32",
        "--device-batch-size",
        "2",
        "--split-tokens",
        "256",
        "--input-version",
        "nanochat:1",
        "--out",
        str(root / "eval_loss"),
    )
    assert loss[-1].outputs == [] and loss[-1].metrics["val_bpb"] < metrics["val_bpb_step0"]
    assert {e.version for e in loss if e.type == "eval"} == {"nanochat:1"}
    measured = json.loads((root / "eval_loss" / "eval.json").read_text())["samples"]
    assert len(measured) == 7 and all(isinstance(x["completion"], str) for x in measured)
    core = run(
        "base_eval",
        "--data-dir",
        data,
        "--init-from",
        str(base),
        "--max-per-task",
        "4",
        "--out",
        str(root / "eval_core"),
    )
    core_metrics = core[-1].metrics
    assert -1.0 <= core_metrics["core"] <= 1.0 and core_metrics["core/ci95"] > 0
    assert (core_metrics["core/items"], core_metrics["core/items_per_task"], core_metrics["core/offline"]) == (12, 4, 1)

    mid, sft, rl = root / "chain_mid", root / "chain_sft", root / "chain_rl"
    run(
        "mid_train",
        *STAGE_OPTIONS["mid_train"],
        "--data-dir",
        data,
        "--init-from",
        str(base),
        "--out",
        str(mid),
        "--num-iterations",
        "10",
        "--eval-every",
        "-1",
    )
    evals = run(
        "chat_eval",
        "--data-dir",
        data,
        "--init-from",
        str(mid),
        "--max-problems",
        "4",
        "--max-new-tokens",
        "8",
        "--device-batch-size",
        "4",
        "--out",
        str(root / "eval_mid"),
    )[-1].metrics
    tasks = {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "identity"}
    assert {k for k in evals if "/" not in k} == tasks | {"chatcore"}
    assert all(0.0 <= evals[k] <= 1.0 and evals[f"{k}/items"] == 4 and evals[f"{k}/ci95"] > 0 for k in tasks)
    sft_events = run(
        "chat_sft",
        *STAGE_OPTIONS["chat_sft"],
        "--data-dir",
        data,
        "--init-from",
        str(mid),
        "--out",
        str(sft),
        "--num-iterations",
        "6",
        "--eval-every",
        "-1",
        "--eval-metrics-every",
        "4",
    )
    # MMLU and ARC-Easy at step 4 and at the end (6 test items each in this data).
    assert [e.name for e in sft_events if e.type == "eval" and e.name.endswith("_acc")] == [
        "mmlu_acc",
        "arc_easy_acc",
    ] * 2
    sft_metrics = sft_events[-1].metrics
    assert sft_metrics["mmlu_acc/items"] == sft_metrics["arc_easy_acc/items"] == 6 and sft_metrics["mmlu_acc/ci95"] > 0
    rl_events = run(
        "chat_rl",
        "--data-dir",
        data,
        "--init-from",
        str(sft),
        "--out",
        str(rl),
        "--num-iterations",
        "1",
        "--examples-per-step",
        "2",
        "--num-samples",
        "2",
        "--max-new-tokens",
        "8",
        "--eval-every",
        "1",
        "--eval-examples",
        "3",
        "--eval-samples",
        "2",
        "--save-every",
        "-1",
    )
    # pass@1 and pass@2 (each with its item count and interval) at step 0 and at the end.
    pass_at_k = [f"gsm8k/pass@{k}{part}" for k in (1, 2) for part in ("", "/items", "/ci95")]
    assert [e.name for e in rl_events if e.type == "eval"] == [*pass_at_k, "mean_reward", *pass_at_k]
    assert rl_events[-1].metrics["gsm8k/pass@2/items"] == 3

    report_dir = root / "report"
    run(
        "report",
        "--out",
        str(report_dir),
        "--init-from",
        str(root / "tok"),
        str(base),
        str(mid),
        str(sft),
        str(rl),
        str(root / "eval_loss"),
        str(root / "eval_core"),
        str(root / "eval_mid"),
    )
    text = (report_dir / "report.md").read_text()
    assert "| Metric | BASE | MID | SFT | RL |" in text and "| ChatCORE |" in text
    pass_row = next(line for line in text.splitlines() if line.startswith("| GSM8K pass@2 (temperature 1.0) |"))
    assert pass_row.startswith("| GSM8K pass@2 (temperature 1.0) |  |  |  | ") and pass_row.endswith(" (n=3) |")
    assert "| CORE (offline bundle, 4 items per task, not comparable to the real CORE) |" in text
    assert (report_dir / "loss.svg").read_text().startswith("<svg ")
    assert "## BASE samples\n\nGreedy completions (base_loss):\n\n- The capital of France is **" in text
    shutil.rmtree(report_dir)
