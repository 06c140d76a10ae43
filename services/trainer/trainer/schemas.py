"""Requests and responses of the jobs API, and `plan_steps`: a request -> validated stage steps.

A job is either one stage (`{"stage": "base_train", "options": {...}}`) or a pipeline
(`{"pipeline": "speedrun", "preset": "tiny", "options": {"base_train": {...}}}`). Each step's
options are the preset's, overridden by the request's, validated by the stage's own pydantic
model from `nanochat.stages.options` (no torch needed). The fields the trainer itself sets
(`data_dir`, `out`, `init_from`, `job_id`, `input_version`) are refused in a request.
"""

from __future__ import annotations

from typing import Any, Literal

from nanochat.stages.options import PIPELINES, PRESETS, STAGES, preset_options, stage_schemas
from nanochat_contracts.names import ALIAS_PATTERN, NAME_PATTERN, VERSION_MAX
from nanochat_contracts.stages import Stage
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

TRAINER_FIELDS = ("data_dir", "out", "init_from", "job_id", "input_version")
# A chat model stage reads any chat model (chat_eval runs after mid, SFT and RL alike).
ACCEPTED_INPUTS: dict[str, set[str]] = {
    "tokenizer": {"tokenizer"},
    "base": {"base"},
    "mid": {"mid", "sft", "rl"},
    "sft": {"mid", "sft", "rl"},
    "rl": {"mid", "sft", "rl"},
}


class InputSpec(BaseModel):
    """The model version a job starts from: exactly one of version, alias or stage."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    version: int | None = Field(None, ge=1, le=VERSION_MAX)
    alias: str | None = Field(None, pattern=ALIAS_PATTERN)
    stage: Stage | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> InputSpec:
        given = [k for k in ("version", "alias", "stage") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of version, alias or stage (got {given or 'none'})")
        return self


class Resources(BaseModel):
    model_config = ConfigDict(extra="forbid")

    nproc_per_node: int = Field(1, ge=1, le=64, description="Processes (GPUs) per node.")
    nnodes: int = Field(
        1, ge=1, le=64, description="Nodes; > 1 runs on a Ray cluster and needs a trainer with TRAINER_EXECUTOR=ray."
    )


class JobRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: str | None = Field(None, description="One stage to run (see GET /v1/stages).")
    pipeline: str | None = Field(None, description="A pipeline of stages, e.g. speedrun.")
    preset: str | None = Field(None, description="Size preset whose options start every step (tiny, d20).")
    options: dict[str, Any] = Field(
        default_factory=dict, description="Stage options; for a pipeline, keyed by stage name."
    )
    input: InputSpec | None = Field(None, description="Input model version (name + version, alias or stage).")
    output_name: str = Field(
        "nanochat", pattern=NAME_PATTERN, description="Model name the outputs are registered under."
    )
    resources: Resources = Field(default_factory=Resources)
    max_attempts: int = Field(
        3,
        ge=1,
        le=10,
        description="Attempts that may fail before the job does: a lost worker or node is retried, from the step "
        "that was cut off (a training stage resumes from its last resumable checkpoint).",
    )
    retry_on_error: bool = Field(
        False, description="Retry a stage's own error (a non-zero exit) too; by default it fails the job at once."
    )

    @model_validator(mode="after")
    def _stage_or_pipeline(self) -> JobRequest:
        if (self.stage is None) == (self.pipeline is None):
            raise ValueError("give exactly one of stage or pipeline")
        if self.stage is not None and self.stage not in STAGES:
            raise ValueError(f"unknown stage {self.stage!r}; stages: {', '.join(STAGES)}")
        if self.pipeline is not None and self.pipeline not in PIPELINES:
            raise ValueError(f"unknown pipeline {self.pipeline!r}; pipelines: {', '.join(PIPELINES)}")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; presets: {', '.join(PRESETS)}")
        return self


class OptionsInvalid(Exception):
    """Stage options that failed validation; `errors` are FastAPI-style error dicts."""

    def __init__(self, errors: list[dict[str, Any]]):
        super().__init__(errors[0]["msg"])
        self.errors = errors


def job_option_schemas() -> list[dict[str, Any]]:
    """The stages as `GET /v1/stages` shows them: each option schema without the fields the
    trainer sets itself, so a form built from it never offers what a job may not set."""
    out = []
    for entry in stage_schemas():
        schema = dict(entry["options_schema"])
        schema["properties"] = {k: v for k, v in schema.get("properties", {}).items() if k not in TRAINER_FIELDS}
        if "required" in schema:
            schema["required"] = [k for k in schema["required"] if k not in TRAINER_FIELDS]
        out.append({**entry, "options_schema": schema})
    return out


def _validate_options(stage: str, preset: str | None, given: Any, loc: list[str | int]) -> dict[str, Any]:
    if not isinstance(given, dict):
        raise OptionsInvalid([{"loc": loc, "msg": "expected an object of options", "type": "dict_type"}])
    reserved = [k for k in given if k in TRAINER_FIELDS]
    if reserved:
        raise OptionsInvalid(
            [
                {"loc": [*loc, k], "msg": f"{k} is set by the trainer, not by a job", "type": "trainer_field"}
                for k in reserved
            ]
        )
    merged = {**(preset_options(preset, stage) if preset else {}), **given}
    try:
        return STAGES[stage].options.model_validate(merged).model_dump(mode="json", exclude=set(TRAINER_FIELDS))
    except ValidationError as e:
        raise OptionsInvalid(
            [{"loc": [*loc, *err["loc"]], "msg": err["msg"], "type": err["type"]} for err in e.errors()]
        ) from None


def plan_steps(request: JobRequest) -> list[dict[str, Any]]:
    """The job's steps `[{stage, options, needs_input}]`; raises OptionsInvalid naming the field."""
    if request.stage is not None:
        options = _validate_options(request.stage, request.preset, request.options, ["body", "options"])
        return [
            {"stage": request.stage, "options": options, "needs_input": STAGES[request.stage].input_stage is not None}
        ]
    names = PIPELINES[request.pipeline]
    unknown = [k for k in request.options if k not in names]
    if unknown:
        raise OptionsInvalid(
            [
                {
                    "loc": ["body", "options", k],
                    "msg": f"{k!r} is not a stage of {request.pipeline}",
                    "type": "unknown_stage",
                }
                for k in unknown
            ]
        )
    return [
        {
            "stage": name,
            "options": _validate_options(
                name, request.preset, request.options.get(name, {}), ["body", "options", name]
            ),
            "needs_input": STAGES[name].input_stage is not None,
        }
        for name in names
    ]


def first_input_stage(steps: list[dict[str, Any]]) -> str | None:
    """The registry stage the job's own input must have: that of the first step reading a model
    before any step has made one; None when the job makes everything it reads."""
    for step in steps:
        info = STAGES[step["stage"]]
        if step["needs_input"]:
            return info.input_stage
        if info.output_stage is not None:
            return None
    return None


class NodeOut(BaseModel):
    node_rank: int
    status: str
    host: str | None
    pgid: int | None
    heartbeat_at: float | None
    error: str | None


class AttemptOut(BaseModel):
    attempt: int = Field(description="1-based.")
    status: str = Field(
        description="queued, running, succeeded, failed, cancelled, lost (its worker or node stopped answering) "
        "or interrupted (its worker shut down)."
    )
    error: str | None
    worker: str | None = Field(description="The worker(s) that ran it.")
    started_at: float | None
    finished_at: float | None
    resumed_from_step: int | None = Field(description="Training step its stage resumed from, when it resumed.")


def attempts_out(job: Any) -> list[AttemptOut]:
    """A job's attempts, oldest first. An attempt still open on an ended job (a queued job
    cancelled before any worker took it) shows the job's end."""
    out = []
    for row in job.attempt_rows:
        view = AttemptOut.model_validate(row, from_attributes=True)
        if job.status in ("succeeded", "failed", "cancelled") and view.status in ("queued", "running"):
            view.status, view.finished_at = job.status, view.finished_at or job.finished_at
        out.append(view)
    return out


class StepOut(BaseModel):
    stage: str
    options: dict[str, Any]


class JobOut(BaseModel):
    id: str
    url: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    stage: str | None
    pipeline: str | None
    preset: str | None
    steps: list[StepOut]
    step_index: int
    current_stage: str | None
    step: int | None = Field(description="Training step of the current stage.")
    total: int | None = Field(description="Steps of the current stage, when known.")
    progress: float = Field(description="Percent of the whole job done.")
    eta_s: float | None = Field(description="Seconds left in the current stage, as the stage estimates.")
    metrics: dict[str, Any] = Field(description="Latest value of every metric.")
    produced: list[dict[str, Any]] = Field(description="Registry versions the job made: name, version, stage.")
    input: dict[str, Any] | None = Field(description="The resolved input version.")
    output_name: str
    resources: Resources
    error: str | None
    log_tail: str | None
    attempt: int = Field(description="The current attempt, 1-based.")
    max_attempts: int
    retry_on_error: bool
    attempts: list[AttemptOut] = Field(description="Every attempt so far, oldest first.")
    cancel_requested: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    nodes: list[NodeOut]


class JobPage(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class StageOut(BaseModel):
    name: str
    description: str
    input_stage: str | None
    output_stage: str | None
    options_schema: dict[str, Any]


class StagesOut(BaseModel):
    stages: list[StageOut]
    pipelines: dict[str, list[str]]
    presets: list[str]


class MetricsOut(BaseModel):
    stage: str | None = Field(
        description="Stage the series are of (by default the current stage, or the "
        "last one that trained when the current one has no curve)."
    )
    series: dict[str, list[tuple[float, float]]] = Field(description="name -> [[step, value], ...]")
    stages: list[str] = Field(default_factory=list, description="The job's stages with a loss curve, in run order.")
