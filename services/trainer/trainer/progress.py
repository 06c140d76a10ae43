"""A running step's events: each appended to the job's `events.jsonl` (tagged with its step) and
folded into the job row (step, total, ETA and the latest metrics) for the API's job view.

The file is the record; the row is a view of it. While the database is unreachable a progress
update is dropped (the next one carries the newer step), an eval's or the end's metrics are retried
for up to `store_outage_limit`, so a database blip never stops the stage."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from nanochat_contracts.job_folder import events_path

from trainer.db import Job
from trainer.node_context import Node
from trainer.outage import TRANSIENT, log, retry_store

# Progress reaches the job row at most this often (a stage may print hundreds a second); the last
# step of a stage is always written.
PROGRESS_WRITE_S = 0.5


class StepEvents:
    """The event callback of one node's run; `last_step` is the latest progress step of the
    current stage (the step an uploaded checkpoint was saved at)."""

    def __init__(self, node: Node):
        self.node = node
        self.lock = threading.Lock()
        self.last_write = 0.0
        self.last_step: int | None = None

    def on_event(self, index: int, event: dict[str, Any]) -> None:
        with self.lock, open(events_path(self.node.ctx.settings.runs_dir, self.node.job_id), "a") as f:
            f.write(json.dumps({**event, "step_index": index}) + "\n")
        kind = event["type"]
        values: dict[str, Any] = {}
        if kind == "progress":
            self.last_step = event["step"]
            now = time.monotonic()
            if now - self.last_write < PROGRESS_WRITE_S and event["step"] != event.get("total"):
                return
            self.last_write = now
            values = {"step": event["step"], "total": event.get("total"), "eta_s": event.get("eta_s")}
            metrics = {k: event[k] for k in ("loss", "lr", "tok_per_s", "mfu") if event.get(k) is not None}
        elif kind == "eval":
            metrics = {event["name"]: event["value"]}
        elif kind == "finished":
            metrics = dict(event.get("metrics") or {})
        else:
            return
        if kind == "progress":
            try:
                self._fold(values, metrics)
            except TRANSIENT as e:
                log.warning("progress of job %s not shown yet (database unreachable): %s", self.node.job_id, e)
            return
        limit = self.node.ctx.settings.store_outage_limit
        retry_store(f"{kind} metrics of job {self.node.job_id}", lambda: self._fold(values, metrics), limit)

    def _fold(self, values: dict[str, Any], metrics: dict[str, Any]) -> None:
        with self.node.ctx.db.session() as s:
            job = s.get(Job, self.node.job_id)
            for k, v in values.items():
                setattr(job, k, v)
            job.metrics = {**(job.metrics or {}), **metrics}
