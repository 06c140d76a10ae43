"""A job's curves for plots, from the JSON events its stages wrote."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from trainer.schemas import MetricsOut


def curves(events: Iterable[dict[str, Any]], stage: str | None, current_stage: str | None) -> MetricsOut:
    """The series of `stage`, else of the current stage, or, when that one draws no loss curve
    (an eval, the report), of the last stage that did; `stages` lists those with a loss curve."""
    by_stage: dict[str, dict[str, list[tuple[float, float]]]] = {}
    last_step: dict[str, float] = {}
    trained: list[str] = []  # stages whose progress carries a loss, in the order they first reported
    for event in events:
        name = event.get("stage")
        series = by_stage.setdefault(name, {})
        if event.get("type") == "progress":
            last_step[name] = event["step"]
            if name not in trained and isinstance(event.get("loss"), (int, float)):
                trained.append(name)
            for key in ("loss", "lr", "tok_per_s", "mfu", "eta_s"):
                if isinstance(event.get(key), (int, float)):
                    series.setdefault(key, []).append((last_step[name], event[key]))
        elif event.get("type") == "eval" and isinstance(event.get("value"), (int, float)):
            series.setdefault(event["name"], []).append((last_step.get(name, 0), event["value"]))
    if stage is None:
        stage = current_stage
        if stage not in trained and trained:
            stage = trained[-1]
    return MetricsOut(stage=stage, series=by_stage.get(stage, {}), stages=trained)
