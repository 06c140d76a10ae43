"""What a finished step leaves in the registry: each output checkpoint uploaded with its lineage
(recorded in the job's `produced`), or, for a stage that makes none (eval, report), its metrics
patched onto the version it measured and its report files attached to it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer.db import Job
from trainer.inputs import REGISTRY_ERRORS
from trainer.node_context import Node, StepFailed
from trainer.runner import tail

REPORT_FILES = (".md", ".png", ".svg", ".json", ".csv", ".tar")  # .tar: hf_export's transformers folder


def register_step(
    node: Node,
    spec: dict[str, Any],
    index: int,
    stage: str,
    finished: dict[str, Any],
    input_ref: dict[str, Any] | None,
    out: Path,
    last_step: int | None,
) -> None:
    """Register step `index`'s `finished` event; a registry that stays unreachable fails the step
    and leaves the output on disk for a retry."""
    try:
        outputs = finished.get("outputs") or []
        for output in outputs:
            _upload(node, spec["output_name"], index, stage, output, finished, input_ref, last_step)
        if input_ref is not None and not outputs:
            _annotate_input(node, input_ref, finished.get("metrics") or {}, out)
    except REGISTRY_ERRORS as e:
        raise StepFailed(
            "failed", f"{e}. The stage's output stays on disk at {out} for a retry.", tail(node.log_path)
        ) from None


def _upload(
    node: Node,
    name: str,
    index: int,
    stage: str,
    output: dict[str, Any],
    finished: dict[str, Any],
    input_ref: dict[str, Any] | None,
    last_step: int | None,
) -> None:
    path = Path(output["path"])
    parent = (input_ref["name"], input_ref["version"]) if input_ref else None
    version = node.with_retries(
        f"upload of {path} as {name} ({output['registry_stage']})",
        lambda: node.ctx.registry.upload(
            path,
            name,
            output["registry_stage"],
            parent=parent,
            job_id=node.job_id,
            metrics=finished.get("metrics") or {},
            step=last_step,
        ),
    )
    node.note(f"registered {name}:{version} ({output['registry_stage']}) from {path}")
    with node.ctx.db.session() as s:
        job = s.get(Job, node.job_id)
        job.produced = [
            *job.produced,
            {
                "name": name,
                "version": version,
                "stage": output["registry_stage"],
                "made_by": stage,
                "step_index": index,
            },
        ]


def _annotate_input(node: Node, input_ref: dict[str, Any], metrics: dict[str, Any], out: Path) -> None:
    """An eval's metrics and a report's files belong to the version they describe."""
    name, version = input_ref["name"], input_ref["version"]
    parent = f"{name}:{version}"
    if metrics:
        node.with_retries(f"metrics of {parent}", lambda: node.ctx.registry.patch_metrics(name, version, metrics))
    if out.is_dir():
        for file in sorted(out.iterdir()):
            if file.is_file() and file.suffix in REPORT_FILES:
                node.with_retries(
                    f"attachment {file.name} of {parent}", lambda f=file: node.ctx.registry.attach(name, version, f)
                )
