"""The report card: what the stages leave behind, read back and rendered as markdown + a PNG.

Inputs the `report` stage reads (any mix, in any order):
- checkpoint / tokenizer folders: their `meta.json` (stage, step, metrics, options, the loss
  curves under `history`);
- eval result folders: `eval.json`, written by an eval stage run with `--out` (`write_eval_result`):
  which stage measured which folder/version, and its metrics;
- event logs (`*.jsonl`): a stage's stdout; `started` -> `finished`/`error` gives its wall time.

`render_report` makes the markdown: environment, the summary table of the spec (CORE, ARC-E,
ARC-C, MMLU, GSM8K, HumanEval, ChatCORE; plus bits-per-byte and identity accuracy) for
BASE / MID / SFT / RL, stage times, and one section per stage. `write_png` is a tiny
dependency-free line-plot writer (zlib + the PNG chunk format; no matplotlib), used for the
training-loss curves.
"""

from __future__ import annotations

import json
import os
import platform
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nanochat.manifest import atomic_folder

EVAL_FILE = "eval.json"
STAGE_ORDER = ("tokenizer", "base", "mid", "sft", "rl")
SUMMARY_ROWS = [
    ("val bpb", "val_bpb"), ("CORE", "core"), ("ARC-Challenge", "ARC-Challenge"), ("ARC-Easy", "ARC-Easy"),
    ("GSM8K", "GSM8K"), ("HumanEval", "HumanEval"), ("MMLU", "MMLU"), ("ChatCORE", "chatcore"),
    ("identity", "identity"),
]
COLOURS = {"base": (31, 119, 180), "mid": (255, 127, 14), "sft": (44, 160, 44), "rl": (214, 39, 40)}


def write_eval_result(out: str | os.PathLike, made_by: str, options: Any, metrics: dict[str, Any]) -> Path:
    """Write an eval stage's metrics to `OUT/eval.json` (atomically, replacing an older result)."""
    record = {
        "made_by": made_by,
        "measured": [str(Path(p).resolve()) for p in options.init_from],
        "input_version": options.input_version,
        "job_id": options.job_id,
        "metrics": metrics,
        "created": time.time(),
    }
    with atomic_folder(out, replace=True) as tmp:
        (tmp / EVAL_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return Path(out)


@dataclass
class Lineage:
    """Everything the report knows, keyed by registry stage (tokenizer, base, mid, sft, rl)."""

    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    durations: list[tuple[str, float]] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e


def event_durations(path: Path) -> list[tuple[str, float]]:
    """(stage, seconds) for each started -> finished/error pair of an event log."""
    from nanochat.stages.events import parse_events

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
            if stage not in STAGE_ORDER:
                raise ValueError(f"{p}/meta.json: unknown stage {stage!r}")
            lineage.meta[stage] = meta
            lineage.metrics.setdefault(stage, {}).update(meta.get("metrics") or {})
            stage_of[str(p.resolve())] = stage
        else:
            raise ValueError(f"{p} is neither a checkpoint folder (meta.json), an eval result ({EVAL_FILE}) nor an event log (.jsonl)")
    for record in evals:
        stages = {stage_of[m] for m in record.get("measured", []) if m in stage_of}
        if len(stages) != 1:
            raise ValueError(f"eval result of {record.get('made_by')} measured {record.get('measured')}, "
                             f"which is not one of the checkpoints given to the report")
        lineage.metrics.setdefault(stages.pop(), {}).update(record.get("metrics") or {})
    return lineage


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def environment() -> dict[str, str]:
    """Where the report was made: Python, torch, the accelerator, the CPU."""
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": str(os.cpu_count())}
    try:
        import torch

        env["torch"] = torch.__version__
        env["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none (CPU)"
    except ImportError:
        env["torch"] = "not installed"
    return env


def render_report(lineage: Lineage, title: str, png_name: str | None) -> str:
    stages = [s for s in STAGE_ORDER[1:] if s in lineage.metrics]
    lines = [f"# {title}", "", f"Made {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", "", "## Environment", ""]
    lines += [f"- {k}: {v}" for k, v in environment().items()]
    code = next((m.get("code_version") for m in lineage.meta.values() if m.get("code_version")), None)
    if code:
        lines.append(f"- nanochat code version: {code}")
    lines += ["", "## Summary", "", "| Metric | " + " | ".join(s.upper() for s in stages) + " |",
              "|---|" + "---|" * len(stages)]
    for label, key in SUMMARY_ROWS:
        values = [lineage.metrics[s].get(key) for s in stages]
        if any(v is not None for v in values):
            lines.append(f"| {label} | " + " | ".join(_fmt(v) for v in values) + " |")
    if lineage.durations:
        total = sum(s for _, s in lineage.durations)
        lines += ["", "## Stage times", "", "| Stage | Seconds |", "|---|---|"]
        lines += [f"| {stage} | {seconds:.1f} |" for stage, seconds in lineage.durations]
        lines.append(f"| **total** | **{total:.1f}** ({total / 60:.1f} min) |")
    if png_name:
        series = loss_series(lineage)
        legend = ", ".join(f"{s} rgb{COLOURS[s]}" for s in series)
        values = [v for pts in series.values() for _, v in pts]
        legend += f"; y axis {min(values):.3f} (bottom) to {max(values):.3f} (top)" if values else ""
        lines += ["", "## Training loss", "", f"![training loss]({png_name})", "",
                  f"Debiased EMA of the training loss per step, the stages one after the other ({legend})."]
    for stage in STAGE_ORDER:
        meta = lineage.meta.get(stage)
        if meta is None and stage not in lineage.metrics:
            continue
        lines += ["", f"## {stage}", ""]
        if meta:
            # Only the facts a run has: a run outside the trainer has no job id, a tokenizer no step.
            facts = [f"made by `{meta.get('made_by')}`"]
            facts += [f"{label} {meta[key]}" for label, key in (("at step", "step"), ("from", "parent"), ("job", "job_id"))
                      if meta.get(key) is not None]
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


def write_png(path: str | os.PathLike, series: dict[str, list[tuple[float, float]]],
              width: int = 800, height: int = 400, margin: int = 30) -> Path:
    """A line plot of the series (colours from COLOURS) with a frame and 5 horizontal grid lines."""
    pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(x: int, y: int, colour: tuple[int, int, int]) -> None:
        if 0 <= x < width and 0 <= y < height:
            i = (y * width + x) * 3
            pixels[i:i + 3] = bytes(colour)

    def line(x0: float, y0: float, x1: float, y1: float, colour: tuple[int, int, int]) -> None:
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        for k in range(n + 1):
            t = k / n
            dot(round(x0 + (x1 - x0) * t), round(y0 + (y1 - y0) * t), colour)

    points = [p for pts in series.values() for p in pts]
    if points:
        xmin, xmax = min(p[0] for p in points), max(p[0] for p in points)
        ymin, ymax = min(p[1] for p in points), max(p[1] for p in points)
        xspan, yspan = (xmax - xmin) or 1.0, (ymax - ymin) or 1.0
        sx = lambda x: margin + (x - xmin) / xspan * (width - 2 * margin)  # noqa: E731
        sy = lambda y: height - margin - (y - ymin) / yspan * (height - 2 * margin)  # noqa: E731
        for g in range(5):
            y = margin + g * (height - 2 * margin) / 4
            line(margin, y, width - margin, y, (225, 225, 225))
        for name, pts in series.items():
            colour = COLOURS.get(name, (0, 0, 0))
            for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
                line(sx(xa), sy(ya), sx(xb), sy(yb), colour)
    for x0, y0, x1, y1 in ((margin, margin, width - margin, margin), (margin, height - margin, width - margin, height - margin),
                           (margin, margin, margin, height - margin), (width - margin, margin, width - margin, height - margin)):
        line(x0, y0, x1, y1, (0, 0, 0))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes(pixels[y * width * 3:(y + 1) * width * 3]) for y in range(height))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)
    return Path(path)
