"""The report card: what the stages leave behind, read back and rendered as markdown + a PNG.

Inputs the `report` stage reads (any mix, in any order):
- checkpoint / tokenizer folders: their `meta.json` (stage, step, metrics, options, the loss
  curves under `history`);
- eval result folders: `eval.json`, written by an eval stage run with `--out` (`write_eval_result`):
  which stage measured which folder/version, and its metrics;
- event logs (`*.jsonl`): a stage's stdout; `started` -> `finished`/`error` gives its wall time.

`render_report` makes the markdown: environment, the summary table of the spec (CORE, ARC-E,
ARC-C, MMLU, GSM8K, HumanEval, ChatCORE; plus bits-per-byte, identity accuracy and chat_rl's
GSM8K pass@1..pass@8) for BASE / MID / SFT / RL, each eval with its item count and 95% interval,
the deviations from the original's recipe that the stages' recorded options show (`deviations`),
stage times, the estimated cost and the code size, and one section per stage. `write_svg` draws
the training-loss curves as an SVG line plot.
"""

from __future__ import annotations

import html
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanochat_contracts.stages import STAGES

from nanochat.artifacts import atomic_folder

EVAL_FILE = "eval.json"
SUMMARY_ROWS = [
    ("val bpb", "val_bpb"),
    ("CORE", "core"),
    ("ARC-Challenge", "ARC-Challenge"),
    ("ARC-Easy", "ARC-Easy"),
    ("GSM8K", "GSM8K"),
    ("HumanEval", "HumanEval"),
    ("MMLU", "MMLU"),
    ("ChatCORE", "chatcore"),
    ("ChatCORE, partial", "chatcore_partial"),
    ("identity", "identity"),
    # chat_rl's own eval: a question counts when any of its first k samples at temperature 1.0 is right.
    *[(f"GSM8K pass@{k} (temperature 1.0)", f"gsm8k/pass@{k}") for k in range(1, 9)],
]
COLOURS = {"base": (31, 119, 180), "mid": (255, 127, 14), "sft": (44, 160, 44), "rl": (214, 39, 40)}


def ci95(accuracy: float, items: int) -> float:
    """Half-width of the 95% interval of an accuracy measured on `items` items.

    Normal approximation with the Agresti-Coull adjustment (2 successes and 2 failures added to
    the variance), so a score of 0 or 1 on a few items still gets an honest, non-zero width."""
    if items <= 0:
        return float("nan")
    p = (accuracy * items + 2) / (items + 4)
    return 1.96 * math.sqrt(p * (1 - p) / (items + 4))


def centered_ci95(tasks: list[tuple[float, int, float]]) -> float:
    """Half-width of the 95% interval of mean((acc - baseline) / (1 - baseline)) over independent
    tasks given as (accuracy, items, baseline): the tasks' variances, each scaled by 1/(1-b)^2,
    summed and divided by the number of tasks squared."""
    if not tasks:
        return float("nan")
    variance = sum((ci95(acc, n) / 1.96) ** 2 / (1 - b) ** 2 for acc, n, b in tasks) / len(tasks) ** 2
    return 1.96 * math.sqrt(variance)


def write_eval_result(
    out: str | os.PathLike,
    made_by: str,
    options: Any,
    metrics: dict[str, Any],
    samples: list[dict[str, str]] | None = None,
) -> Path:
    """Write an eval stage's metrics (and any model samples) to `OUT/eval.json` (atomically,
    replacing an older result)."""
    record = {
        "made_by": made_by,
        "measured": [str(Path(p).resolve()) for p in options.init_from],
        "input_version": options.input_version,
        "job_id": options.job_id,
        "metrics": metrics,
        "created": time.time(),
    }
    if samples is not None:
        record["samples"] = samples
    with atomic_folder(out, replace=True) as tmp:
        (tmp / EVAL_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out)


@dataclass
class Lineage:
    """Everything the report knows, keyed by registry stage (tokenizer, base, mid, sft, rl)."""

    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    durations: list[tuple[str, float]] = field(default_factory=list)
    samples: dict[str, tuple[str, list[dict[str, str]]]] = field(default_factory=dict)  # stage: (made by, samples)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e


def event_durations(path: Path) -> list[tuple[str, float]]:
    """(stage, seconds) for each started -> finished/error pair of an event log."""
    from nanochat_contracts.events import parse_events

    out, started = [], {}
    with open(path, encoding="utf-8") as f:
        for event in parse_events(f):
            if event.type == "started":
                started[event.stage] = event.ts
            elif event.type in ("finished", "error") and event.stage in started:
                out.append((event.stage, event.ts - started.pop(event.stage)))
    return out


def read_lineage(paths: list[str]) -> Lineage:
    """Read checkpoint folders, eval result folders and event logs (see the module docstring)."""
    lineage = Lineage()
    stage_of: dict[str, str] = {}
    evals = []
    for p in map(Path, paths):
        if p.is_file() and p.suffix == ".jsonl":
            lineage.durations += event_durations(p)
        elif (p / EVAL_FILE).is_file():
            evals.append(_read_json(p / EVAL_FILE))
        elif (p / "meta.json").is_file():
            meta = _read_json(p / "meta.json")
            stage = meta.get("stage")
            if stage not in STAGES:
                raise ValueError(f"{p}/meta.json: unknown stage {stage!r}")
            lineage.meta[stage] = meta
            lineage.metrics.setdefault(stage, {}).update(meta.get("metrics") or {})
            if meta.get("samples"):
                lineage.samples.setdefault(
                    stage, (f"{meta.get('made_by')} at step {meta['samples']['step']}", meta["samples"]["samples"])
                )
            stage_of[str(p.resolve())] = stage
        else:
            raise ValueError(
                f"{p} is neither a checkpoint folder (meta.json), an eval result ({EVAL_FILE}) nor an event log (.jsonl)"
            )
    for record in evals:
        stages = {stage_of[m] for m in record.get("measured", []) if m in stage_of}
        if len(stages) != 1:
            raise ValueError(
                f"eval result of {record.get('made_by')} measured {record.get('measured')}, "
                f"which is not one of the checkpoints given to the report"
            )
        stage = stages.pop()
        lineage.metrics.setdefault(stage, {}).update(record.get("metrics") or {})
        if record.get("samples"):
            # An eval of the finished checkpoint wins over the samples taken while training.
            lineage.samples[stage] = (str(record.get("made_by")), record["samples"])
    return lineage


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def environment() -> dict[str, Any]:
    """Where this process runs: Python, torch, the CPUs and the GPUs (name, count, memory)."""
    env: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        import torch
    except ImportError:
        return {**env, "torch": "not installed", "gpus": 0}
    env["torch"] = torch.__version__
    env["gpus"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if env["gpus"]:
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env


def code_size(root: Path) -> dict[str, int]:
    """Files, lines and characters of the Python code under `root`; tokens estimated as chars / 4."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted(root.rglob("*.py"))]
    chars = sum(map(len, texts))
    return {"files": len(texts), "lines": sum(t.count("\n") for t in texts), "chars": chars, "tokens": chars // 4}


def _cell(metrics: dict[str, Any], key: str) -> str:
    """A summary value with its 95% interval and item count when the eval recorded them."""
    value = metrics.get(key)
    if value is None:
        return ""
    text = _fmt(value)
    if metrics.get(f"{key}/ci95") is not None:
        text += f" ± {metrics[f'{key}/ci95']:.3f}"
    if metrics.get(f"{key}/items") is not None:
        text += f" (n={metrics[f'{key}/items']})"
    return text


def _row_label(label: str, key: str, per_stage: list[dict[str, Any]]) -> str:
    if key == "core" and any(m.get("core/offline") for m in per_stage):
        items = next(m["core/items_per_task"] for m in per_stage if m.get("core/items_per_task"))
        return f"CORE (offline bundle, {items} items per task, not comparable to the real CORE)"
    if key == "chatcore_partial":
        tasks = next(m["chatcore_partial/tasks"] for m in per_stage if m.get("chatcore_partial/tasks"))
        return f"ChatCORE, partial ({tasks} of 5 tasks)"
    return label


def _environment_lines(lineage: Lineage, gpu_hour_price: float) -> list[str]:
    # The hardware the training ran on (recorded in base's meta), else this machine's.
    trained_on = next(
        (
            lineage.meta[s]["hardware"]
            for s in ("base", "mid", "sft", "rl")
            if (lineage.meta.get(s) or {}).get("hardware")
        ),
        None,
    )
    env = trained_on or environment()
    lines = [f"- {k}: {v}" for k, v in env.items()]
    if not trained_on:
        lines.append("- (hardware of the machine that wrote the report: the checkpoints recorded none)")
    code = next((m.get("code_version") for m in lineage.meta.values() if m.get("code_version")), None)
    if code:
        commit = code.split("+g", 1)[1] if "+g" in code else "unknown (not a git checkout)"
        dirty = commit.endswith(".dirty")
        lines.append(
            f"- nanochat {code.split('+', 1)[0]}, git commit {commit.removesuffix('.dirty')}"
            + (", dirty: uncommitted changes" if dirty else ", clean" if "+g" in code else "")
        )
    seconds = sum(s for _, s in lineage.durations)
    gpus = int(env.get("gpus") or 0)
    if gpus:
        hours = seconds / 3600 * gpus
        lines.append(f"- estimated cost: {hours:.2f} GPU-hours x ${gpu_hour_price:.2f} = ${hours * gpu_hour_price:.2f}")
    else:
        lines.append("- estimated cost: no GPU (CPU run), 0 GPU-hours")
    size = code_size(Path(__file__).parent)
    lines.append(
        f"- code size (the nanochat library): {size['files']} files, {size['lines']:,} lines, "
        f"{size['chars']:,} characters, ~{size['tokens']:,} tokens (characters / 4)"
    )
    return lines


def deviations(lineage: Lineage) -> list[str]:
    """Where the run's recorded options left the original's recipe, so its numbers are not read as
    the original's: one sentence each, from the stages' meta.json options."""
    found = []
    sft_options = (lineage.meta.get("sft") or {}).get("options") or {}
    if sft_options.get("identity_in_mixture"):
        found.append(
            "SFT mixture: the identity conversations were added (`identity_in_mixture`); the original's "
            "is ARC-Easy, ARC-Challenge, GSM8K and 10K SmolTalk conversations."
        )
    if sft_options.get("tool_use_in_mixture"):
        found.append(
            f"SFT mixture: {sft_options['tool_use_in_mixture']} synthetic tool-use conversations were added "
            "(`tool_use_in_mixture`, docs/tools.md); the original's has none."
        )
    return found


def render_report(lineage: Lineage, title: str, plot_name: str | None, gpu_hour_price: float = 3.0) -> str:
    stages = [s for s in STAGES[1:] if s in lineage.metrics]
    lines = [f"# {title}", "", f"Made {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", "", "## Environment", ""]
    lines += _environment_lines(lineage, gpu_hour_price)
    lines += [
        "",
        "## Summary",
        "",
        "Evals show the score ± the half-width of its 95% interval and (n=) the items scored.",
        "",
        "| Metric | " + " | ".join(s.upper() for s in stages) + " |",
        "|---|" + "---|" * len(stages),
    ]
    for label, key in SUMMARY_ROWS:
        per_stage = [lineage.metrics[s] for s in stages]
        if any(m.get(key) is not None for m in per_stage):
            lines.append(
                f"| {_row_label(label, key, per_stage)} | " + " | ".join(_cell(m, key) for m in per_stage) + " |"
            )
    if found := deviations(lineage):
        lines += ["", "## Deviations from the original", ""] + [f"- {d}" for d in found]
    if lineage.durations:
        total = sum(s for _, s in lineage.durations)
        lines += ["", "## Stage times", "", "| Stage | Seconds |", "|---|---|"]
        lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in lineage.durations]
        lines.append(f"| **total** | **{total:.1f}** ({total / 60:.1f} min) |")
    if plot_name:
        lines += [
            "",
            "## Training loss",
            "",
            f"![training loss]({plot_name})",
            "",
            "Debiased EMA of the training loss per step, the stages one after the other.",
        ]
    for stage, (made_by, samples) in lineage.samples.items():
        lines += ["", f"## {stage.upper()} samples", "", f"Greedy completions ({made_by}):", ""]
        lines += [f"- {s['prompt']} **{s['completion'].strip().replace(chr(10), ' ↵ ')}**" for s in samples]
    for stage in STAGES:
        meta = lineage.meta.get(stage)
        if meta is None and stage not in lineage.metrics:
            continue
        lines += ["", f"## {stage}", ""]
        if meta:
            # Only the facts a run has: a run outside the trainer has no job id, a tokenizer no step.
            facts = [f"made by `{meta.get('made_by')}`"]
            facts += [
                f"{label} {meta[key]}"
                for label, key in (("at step", "step"), ("from", "parent"), ("job", "job_id"))
                if meta.get(key) is not None
            ]
            lines.append("- " + ", ".join(facts))
        for key, value in sorted(lineage.metrics.get(stage, {}).items()):
            lines.append(f"- {key}: {_fmt(value)}")
    return "\n".join(lines) + "\n"


def loss_series(lineage: Lineage) -> dict[str, list[tuple[float, float]]]:
    """Each language-model training stage's loss curve, one after the other on a shared step
    axis (RL's policy-gradient loss is no language-model loss and is left out)."""
    series, offset = {}, 0.0
    for stage in ("base", "mid", "sft"):
        points = (lineage.meta.get(stage, {}).get("history") or {}).get("train_loss") or []
        if points:
            series[stage] = [(offset + s, v) for s, v in points if v is not None]
            offset += points[-1][0]
    return series


def write_svg(
    path: str | os.PathLike,
    series: dict[str, list[tuple[float, float]]],
    width: int = 800,
    height: int = 400,
    margin: int = 50,
) -> Path:
    """A line plot of the series (colours from COLOURS) with a frame, 5 labelled grid lines,
    the step range under the x axis and a legend."""
    points = [p for pts in series.values() for p in pts]
    xmin, xmax = (min(p[0] for p in points), max(p[0] for p in points)) if points else (0.0, 1.0)
    ymin, ymax = (min(p[1] for p in points), max(p[1] for p in points)) if points else (0.0, 1.0)
    xspan, yspan = (xmax - xmin) or 1.0, (ymax - ymin) or 1.0
    inner_w, inner_h = width - 2 * margin, height - 2 * margin

    def sx(x: float) -> float:
        return margin + (x - xmin) / xspan * inner_w

    def sy(y: float) -> float:
        return height - margin - (y - ymin) / yspan * inner_h

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
    ]
    for g in range(5):
        value = ymin + yspan * g / 4
        y = sy(value)
        out.append(f'<line x1="{margin}" y1="{y:.1f}" x2="{width - margin}" y2="{y:.1f}" stroke="#e1e1e1"/>')
        out.append(f'<text x="{margin - 4}" y="{y + 4:.1f}" text-anchor="end">{value:.3f}</text>')
    out.append(f'<rect x="{margin}" y="{margin}" width="{inner_w}" height="{inner_h}" fill="none" stroke="black"/>')
    out.append(f'<text x="{margin}" y="{height - margin + 16}">step {xmin:g}</text>')
    out.append(f'<text x="{width - margin}" y="{height - margin + 16}" text-anchor="end">step {xmax:g}</text>')
    for i, (name, pts) in enumerate(series.items()):
        colour = "rgb({},{},{})".format(*COLOURS.get(name, (0, 0, 0)))
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}"/>')
        out.append(f'<text x="{margin + 8 + 60 * i}" y="{margin - 10}" fill="{colour}">{html.escape(name)}</text>')
    out.append("</svg>")
    Path(path).write_text("\n".join(out) + "\n")
    return Path(path)
