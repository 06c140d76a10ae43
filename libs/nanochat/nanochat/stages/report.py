"""report: the report card of a lineage, from its checkpoints' meta, eval results and event logs.

    python -m nanochat.stages.report --out runs/report \\
        --init-from runs/base runs/mid runs/sft runs/rl runs/eval_base_loss runs/eval_mid ... runs/events/*.jsonl

`--init-from` takes checkpoint folders (meta.json: stage, metrics, loss curves), eval result
folders (`eval.json`, from an eval stage run with `--out`) and stage event logs (`*.jsonl`, for
each stage's wall time); see `nanochat.report`. Writes `OUT/report.md` (environment, the summary
table BASE / MID / SFT / RL with items and 95% intervals, stage times, estimated cost at
`--gpu-hour-price`, code size, one section per stage) and `OUT/loss.svg` (training loss of every
training stage), atomically. The
trainer attaches both files to the final version; `finished` has no outputs and the summary
table's numbers as metrics.
"""

from __future__ import annotations

from typing import Any

from nanochat.artifacts import atomic_folder
from nanochat.report import SUMMARY_ROWS, loss_series, read_lineage, render_report, write_svg
from nanochat.stages.cli import log, run_stage
from nanochat.stages.events import EventEmitter
from nanochat.stages.options import ReportOptions

PLOT_NAME = "loss.svg"


def report(options: ReportOptions, emitter: EventEmitter) -> tuple[list, dict[str, Any]]:
    if not options.init_from:
        raise ValueError("--init-from must name the lineage's checkpoint folders (and eval results, event logs)")
    lineage = read_lineage(options.init_from)
    series = loss_series(lineage)
    with atomic_folder(options.out, replace=True) as tmp:
        if series:
            write_svg(tmp / PLOT_NAME, series)
        plot = PLOT_NAME if series else None
        (tmp / "report.md").write_text(render_report(lineage, options.title, plot, options.gpu_hour_price))
    metrics = {
        f"{stage}/{key}": lineage.metrics[stage][key]
        for stage in lineage.metrics
        for _, key in SUMMARY_ROWS
        if key in lineage.metrics[stage]
    }
    if lineage.durations:
        metrics["total_seconds"] = sum(s for _, s in lineage.durations)
    log(f"report card written to {options.out}/report.md")
    return [], metrics


if __name__ == "__main__":
    run_stage("report", report, rank_zero_only=True)
