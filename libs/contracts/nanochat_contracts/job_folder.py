"""A training job's folder under the trainer's runs_dir: the worker (and every executor) writes
it, the trainer API reads it, so both import the layout from here.

    jobs/JOB/events.jsonl                 every node's stage events, each tagged with its step_index
    jobs/JOB/log-nodeR.txt                node R's stage output and the trainer's notes
    jobs/JOB/stepII-STAGE.json            step II's options, the stage's --config
    jobs/JOB/steps/II-STAGE/              step II's --out
    jobs/JOB/steps/II-report-inputs/      what a report step reads besides its input version
"""

from __future__ import annotations

from pathlib import Path


def job_dir(runs_dir: Path, job_id: str) -> Path:
    return runs_dir / "jobs" / job_id


def log_path(runs_dir: Path, job_id: str, node_rank: int) -> Path:
    return job_dir(runs_dir, job_id) / f"log-node{node_rank}.txt"


def events_path(runs_dir: Path, job_id: str) -> Path:
    return job_dir(runs_dir, job_id) / "events.jsonl"


def step_config(folder: Path, index: int, stage: str) -> Path:
    """Step `index`'s options file inside the job folder `folder`."""
    return folder / f"step{index:02d}-{stage}.json"


def step_out(folder: Path, index: int, stage: str) -> Path:
    """Step `index`'s output folder inside the job folder `folder`."""
    return folder / "steps" / f"{index:02d}-{stage}"


def report_inputs_dir(folder: Path, index: int) -> Path:
    """Where a report step's extra inputs (ancestors' metrics, the job's events) are gathered."""
    return folder / "steps" / f"{index:02d}-report-inputs"
