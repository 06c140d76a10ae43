"""The report card: intervals worked out by hand, honest labels, the environment facts, the SVG plot."""

import json
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import pytest
from nanochat.report import Lineage, centered_ci95, ci95, read_lineage, render_report, write_eval_result, write_svg


def test_ci95_is_the_agresti_coull_half_width():
    # 48/96 right: p~ = (48 + 2) / (96 + 4) = 0.5, half-width = 1.96 * sqrt(0.25 / 100) = 0.098.
    assert ci95(0.5, 96) == pytest.approx(0.098)
    # 0/46 right still has a width: p~ = 2 / 50 = 0.04, 1.96 * sqrt(0.04 * 0.96 / 50) = 0.054317...
    assert ci95(0.0, 46) == pytest.approx(1.96 * (0.0384 / 50) ** 0.5)
    assert ci95(0.0, 46) == pytest.approx(0.0543175, abs=1e-6)


def test_centered_ci95_scales_each_task_by_its_baseline():
    # Each task: sd 0.05. Centred by baseline 0.25 -> sd 0.05 / 0.75; by 0 -> 0.05. The mean of two:
    # var = (0.0025 / 0.5625 + 0.0025) / 4 = 0.0069444 / 4 = 1/576, sd = 1/24, half-width = 1.96 / 24.
    assert centered_ci95([(0.5, 96, 0.25), (0.5, 96, 0.0)]) == pytest.approx(1.96 / 24)


def _lineage(**base_metrics) -> Lineage:
    hardware = {
        "python": "3.11.7",
        "cpus": 2,
        "torch": "2.9.0",
        "gpus": 8,
        "gpu": "NVIDIA H100 80GB HBM3",
        "gpu_memory_gib": 79.2,
    }
    return Lineage(
        meta={
            "base": {
                "stage": "base",
                "made_by": "base_train",
                "step": 10,
                "code_version": "0.1.0+g0123456789ab.dirty",
                "hardware": hardware,
            }
        },
        metrics={
            "base": base_metrics,
            "sft": {
                "ARC-Easy": 0.5,
                "ARC-Easy/items": 96,
                "ARC-Easy/ci95": 0.098,
                "chatcore_partial": 0.2,
                "chatcore_partial/ci95": 0.1,
                "chatcore_partial/tasks": 2,
            },
        },
        durations=[("base_train", 1800.0), ("chat_sft", 1800.0)],
    )


def test_report_names_the_offline_core_and_shows_items_and_intervals():
    text = render_report(
        _lineage(core=0.2022, **{"core/ci95": 0.05, "core/items": 300, "core/offline": 1, "core/items_per_task": 100}),
        "card",
        None,
    )
    assert (
        "| CORE (offline bundle, 100 items per task, not comparable to the real CORE) | 0.2022 ± 0.050 (n=300) |  |"
        in text
    )
    assert "| ARC-Easy |  | 0.5000 ± 0.098 (n=96) |" in text
    assert "| ChatCORE, partial (2 of 5 tasks) |  | 0.2000 ± 0.100 |" in text
    assert "| ChatCORE |" not in text


def test_report_environment_gives_hardware_commit_cost_and_code_size():
    text = render_report(_lineage(core=0.25), "card", None, gpu_hour_price=2.5)
    assert "- gpu: NVIDIA H100 80GB HBM3" in text and "- gpus: 8" in text and "- gpu_memory_gib: 79.2" in text
    assert "git commit 0123456789ab, dirty: uncommitted changes" in text
    # One hour of stages on 8 GPUs: 8 GPU-hours at $2.50.
    assert "- estimated cost: 8.00 GPU-hours x $2.50 = $20.00" in text
    assert "- code size (the nanochat library): " in text and " files, " in text
    assert "| CORE | 0.2500 |" in text  # a downloaded bundle keeps the plain name


def test_svg_plot_draws_each_series(tmp_path):
    path = write_svg(
        tmp_path / "loss.svg",
        {"base": [(0, 5.0), (10, 3.0)], "mid": [(10, 2.0), (20, 1.5)]},
        width=200,
        height=100,
        margin=20,
    )
    root = ET.fromstring(path.read_text())
    lines = root.findall("{http://www.w3.org/2000/svg}polyline")
    assert [line.get("stroke") for line in lines] == ["rgb(31,119,180)", "rgb(255,127,14)"]
    # x: 20 + step / 20 * 160; y: 80 - (loss - 1.5) / 3.5 * 60. base (0, 5.0) -> (20, 20); mid (20, 1.5) -> (180, 80).
    assert lines[0].get("points").split()[0] == "20.0,20.0"
    assert lines[1].get("points").split()[-1] == "180.0,80.0"


def test_report_prints_the_base_samples_of_the_last_measurement(tmp_path):
    base, evaluated = tmp_path / "base", tmp_path / "eval_loss"
    base.mkdir()
    trained = {"step": 60, "samples": [{"prompt": "The capital of France is", "completion": " Lyon, the"}]}
    (base / "meta.json").write_text(json.dumps({"stage": "base", "made_by": "base_train", "samples": trained}))
    text = render_report(read_lineage([str(base)]), "card", None)
    assert (
        "## BASE samples\n\nGreedy completions (base_train at step 60):\n\n- The capital of France is **Lyon, the**"
        in text
    )

    write_eval_result(
        evaluated,
        "base_loss",
        SimpleNamespace(init_from=[str(base)], input_version=[], job_id=None),
        {"val_bpb": 1.5},
        [{"prompt": "The capital of France is", "completion": " Paris.\nThe"}],
    )
    text = render_report(read_lineage([str(base), str(evaluated)]), "card", None)
    assert "Greedy completions (base_loss):\n\n- The capital of France is **Paris. ↵ The**" in text
    assert "Lyon" not in text


def test_report_shows_rl_pass_at_k_with_items_and_interval(tmp_path):
    rl = tmp_path / "rl"
    rl.mkdir()
    metrics = {
        "gsm8k/pass@1": 0.5,
        "gsm8k/pass@1/items": 96,
        "gsm8k/pass@1/ci95": 0.098,
        "gsm8k/pass@8": 0.75,
        "gsm8k/pass@8/items": 96,
        "gsm8k/pass@8/ci95": 0.086,
    }
    (rl / "meta.json").write_text(json.dumps({"stage": "rl", "made_by": "chat_rl", "metrics": metrics}))
    text = render_report(read_lineage([str(rl)]), "card", None)
    assert "| GSM8K pass@1 (temperature 1.0) | 0.5000 ± 0.098 (n=96) |" in text
    assert "| GSM8K pass@8 (temperature 1.0) | 0.7500 ± 0.086 (n=96) |" in text
    assert "pass@2 (temperature" not in text  # a k the run did not measure gets no row


def test_report_lists_the_identity_conversations_in_sft_as_a_deviation(tmp_path):
    sft = tmp_path / "sft"
    sft.mkdir()
    meta = {
        "stage": "sft",
        "made_by": "chat_sft",
        "metrics": {"val_loss": 1.0},
        "options": {"identity_in_mixture": True},
    }
    (sft / "meta.json").write_text(json.dumps(meta))
    text = render_report(read_lineage([str(sft)]), "card", None)
    assert (
        "## Deviations from the original\n\n- SFT mixture: the identity conversations were added "
        "(`identity_in_mixture`); the original's is ARC-Easy, ARC-Challenge, GSM8K and 10K SmolTalk conversations.\n"
        in text
    )
    (sft / "meta.json").write_text(json.dumps({**meta, "options": {"identity_in_mixture": False}}))
    assert "Deviations from the original" not in render_report(read_lineage([str(sft)]), "card", None)
