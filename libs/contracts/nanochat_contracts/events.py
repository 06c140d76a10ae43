"""Stage events: one JSON object per line on stdout, the contract between a stage and the trainer.

Human logs go to stderr; stdout carries only these lines (rank 0 only under torchrun, the rank
taken from the RANK environment variable). Every event has:

    type          "started" | "progress" | "eval" | "checkpoint" | "finished" | "error"
    stage         the stage name, e.g. "base_train"
    job_id        the trainer job id given with --job-id (null when run by hand)
    input_versions the --input-version values, ["NAME:VERSION", ...]
    ts            unix time in seconds

and per type:

    started     options {...}                       the validated options of the run
    progress    step, total, loss, lr, tok_per_s, mfu, eta_s   (numbers; null when not known)
    eval        name, value, version?               a metric; version = "NAME:VERSION" measured
    checkpoint  path, step                          a resumable checkpoint was saved
    finished    outputs [{path, registry_stage}], metrics {...}   last line of a successful run
    error       message                             last line of a failed or stopped run

e.g. `{"type": "finished", "stage": "tok_train", "job_id": "j1", "input_versions": [],
"ts": 1.7e9, "outputs": [{"path": "runs/tok", "registry_stage": "tokenizer"}], "metrics": {}}`.

Here are the event models and the readers: `parse_event_line` / `parse_events` read lines back,
skipping lines that are not JSON events (a library printing to stdout never breaks the trainer).
The writer, `nanochat.stages.events.EventEmitter`, lives with the stages (it knows torchrun's
ranks); the trainer reads with this module alone, without the ML library's dependencies.
`registry_stage` is a `nanochat_contracts.stages.Stage`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from nanochat_contracts.stages import Stage


class StageEvent(BaseModel):
    """The fields every event has."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    job_id: str | None = None
    input_versions: list[str] = Field(default_factory=list)
    ts: float = Field(default_factory=time.time)


class Started(StageEvent):
    type: Literal["started"] = "started"
    options: dict[str, Any] = Field(default_factory=dict)


class Progress(StageEvent):
    type: Literal["progress"] = "progress"
    step: int
    total: int | None = None
    loss: float | None = None
    lr: float | None = None
    tok_per_s: float | None = None
    mfu: float | None = None
    eta_s: float | None = None


class Eval(StageEvent):
    type: Literal["eval"] = "eval"
    name: str
    value: float | None
    version: str | None = None


class Checkpoint(StageEvent):
    type: Literal["checkpoint"] = "checkpoint"
    path: str
    step: int


class Output(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str
    registry_stage: Stage


class Finished(StageEvent):
    type: Literal["finished"] = "finished"
    outputs: list[Output] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)


class Error(StageEvent):
    type: Literal["error"] = "error"
    message: str


Event = Annotated[Started | Progress | Eval | Checkpoint | Finished | Error, Field(discriminator="type")]
_EVENT = TypeAdapter(Event)


def parse_event_line(line: str) -> Started | Progress | Eval | Checkpoint | Finished | Error | None:
    """One stdout line -> its event, or None when the line is not a valid event."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        return _EVENT.validate_json(line)
    except ValidationError:
        return None


def parse_events(lines: Iterable[str]) -> Iterator[Started | Progress | Eval | Checkpoint | Finished | Error]:
    """The events among `lines`, in order, other lines skipped."""
    for line in lines:
        event = parse_event_line(line)
        if event is not None:
            yield event


def event_json_schema() -> dict[str, Any]:
    """JSON Schema of one event line (for the trainer's docs)."""
    return _EVENT.json_schema()


if __name__ == "__main__":
    print(json.dumps(event_json_schema(), indent=2))
