"""A step's inputs, fetched from the registry before its stage starts: the input version (the
newest one this job made, else the job's own input) and, for `report`, everything it reads besides."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from nanochat.report import EVAL_FILE
from nanochat_contracts.job_folder import events_path

from trainer.db import Job
from trainer.node_context import Node, StepFailed
from trainer.registry import RegistryRejected, RegistryUnavailable, VersionNotFound

REGISTRY_ERRORS = (RegistryUnavailable, RegistryRejected, VersionNotFound)


def input_for(node: Node, step: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any] | None:
    """The version `step` reads, downloaded: its ref ({name, version, ...}) plus the local `path`;
    None for a stage that reads no model."""
    if not step.get("needs_input"):
        return None
    with node.ctx.db.session() as s:
        produced = s.get(Job, node.job_id).produced
    ref = produced[-1] if produced else spec.get("input")
    if ref is None:
        raise StepFailed("failed", f"stage {step['stage']} needs an input model and none was given or made")
    try:
        path = node.with_retries(
            f"download {ref['name']}:{ref['version']}", lambda: node.ctx.registry.download(ref["name"], ref["version"])
        )
    except REGISTRY_ERRORS as e:
        raise StepFailed("failed", f"input {ref['name']}:{ref['version']}: {e}") from None
    return {**ref, "path": str(path)}


def report_inputs(node: Node, folder: Path, input_ref: dict[str, Any]) -> tuple[list[str], list[str]]:
    """What `report` reads besides the input version, gathered in `folder`: every ancestor's folder,
    each version's registry metrics (the eval stages patched them there) as an eval result, and this
    job's stage events (for stage times); and the ancestors' NAME:VERSION."""
    name, version = input_ref["name"], input_ref["version"]
    folder.mkdir(parents=True, exist_ok=True)
    try:
        chain = node.with_retries(f"lineage of {name}:{version}", lambda: node.ctx.registry.lineage(name, version))
        paths, versions = [], []
        for i, v in enumerate(chain):
            if i == 0:
                path = input_ref["path"]
            else:
                path = str(
                    node.with_retries(
                        f"download {v.name}:{v.version}", lambda v=v: node.ctx.registry.download(v.name, v.version)
                    )
                )
                paths.append(path)
                versions.append(f"{v.name}:{v.version}")
            result = folder / f"metrics-{v.name}-v{v.version}"
            result.mkdir(exist_ok=True)
            (result / EVAL_FILE).write_text(
                json.dumps(
                    {
                        "made_by": "registry",
                        "measured": [str(Path(path).resolve())],
                        "input_version": [f"{v.name}:{v.version}"],
                        "job_id": v.job_id,
                        "metrics": v.metrics,
                    }
                )
            )
            paths.append(str(result))
    except REGISTRY_ERRORS as e:
        raise StepFailed("failed", f"lineage of {name}:{version}: {e}") from None
    events = folder / "events.jsonl"
    source = events_path(node.ctx.settings.runs_dir, node.job_id)
    lines = source.read_text().splitlines() if source.exists() else []
    # The job log tags each event with its step; the stage event schema has no such field.
    events.write_text(
        "".join(
            json.dumps({k: v for k, v in json.loads(line).items() if k != "step_index"}) + "\n"
            for line in lines
            if line.strip()
        )
    )
    return [*paths, str(events)], versions
