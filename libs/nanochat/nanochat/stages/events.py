"""The stages' side of the event contract (`nanochat_contracts.events`): `EventEmitter` writes a
stage's events to stdout as JSON lines, one object per line, flushed at once.

Human logs go to stderr; stdout carries only these lines, written on rank 0 only under torchrun
(the rank taken from the RANK environment variable), so a job's events are one stream whatever
its process count.
"""

from __future__ import annotations

import os
import sys
from typing import Any, TextIO

from nanochat_contracts.events import Checkpoint, Error, Eval, Finished, Progress, StageEvent, Started


def is_rank_zero() -> bool:
    """True in a single process and on rank 0 of a torchrun job."""
    return int(os.environ.get("RANK", "0")) == 0


class EventEmitter:
    """Writes a stage's events to stdout as JSON lines; silent on ranks other than 0."""

    def __init__(
        self,
        stage: str,
        job_id: str | None = None,
        input_versions: list[str] | None = None,
        stream: TextIO | None = None,
    ):
        self.stage = stage
        self.job_id = job_id
        self.input_versions = list(input_versions or [])
        self.stream = stream
        self.enabled = is_rank_zero()

    def _emit(self, cls: type[StageEvent], **fields: Any) -> None:
        if not self.enabled:
            return
        event = cls(stage=self.stage, job_id=self.job_id, input_versions=self.input_versions, **fields)
        stream = self.stream or sys.stdout
        stream.write(event.model_dump_json() + "\n")
        stream.flush()

    def started(self, options: dict[str, Any]) -> None:
        self._emit(Started, options=options)

    def progress(
        self,
        step: int,
        total: int | None = None,
        loss: float | None = None,
        lr: float | None = None,
        tok_per_s: float | None = None,
        mfu: float | None = None,
        eta_s: float | None = None,
    ) -> None:
        self._emit(Progress, step=step, total=total, loss=loss, lr=lr, tok_per_s=tok_per_s, mfu=mfu, eta_s=eta_s)

    def eval(self, name: str, value: float | None, version: str | None = None) -> None:
        self._emit(Eval, name=name, value=value, version=version)

    def checkpoint(self, path: str, step: int) -> None:
        self._emit(Checkpoint, path=str(path), step=step)

    def finished(self, outputs: list[dict[str, str]] | None = None, metrics: dict[str, Any] | None = None) -> None:
        self._emit(Finished, outputs=outputs or [], metrics=metrics or {})

    def error(self, message: str) -> None:
        self._emit(Error, message=message)
