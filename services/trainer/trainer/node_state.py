"""A node's rows in the database over its run: the claim that starts it, the heartbeat while it
runs, and its end (finished, or put back on the queue when its worker shuts down).

Each write comes before the reads it guards (on SQLite that takes the write lock first), and only
the claiming worker's row is closed: after a re-queue the row may belong to another worker.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from trainer.db import TERMINAL, Database, Job, JobNode
from trainer.dispatch import enqueue_job
from trainer.node_context import Context
from trainer.periodic import Periodic

log = logging.getLogger("trainer.worker")  # these lines are the worker's, whichever module writes them


@dataclass(frozen=True)
class Claim:
    """What a node's run needs from the job row it claimed."""

    spec: dict[str, Any]
    attempt: int
    start: int
    nnodes: int


def claim_node(ctx: Context, job_id: str, node_rank: int) -> Claim | None:
    """Take a queued node row for this worker; None if it was taken, or the job ended or is cancelled."""
    now = time.time()
    with ctx.db.session() as s:
        # Write first (the node row, only if still queued): a concurrent cancel or a second
        # delivery of the same task then finds it taken.
        taken = s.execute(
            update(JobNode)
            .where(JobNode.job_id == job_id, JobNode.node_rank == node_rank, JobNode.status == "queued")
            .values(status="running", host=ctx.settings.host, worker=ctx.name, heartbeat_at=now, pgid=None, error=None)
        ).rowcount
        if not taken:
            log.warning("job %s node %d is not queued; task dropped", job_id, node_rank)
            return None
        job = s.get(Job, job_id)
        if job.status in TERMINAL or job.cancel_requested:
            s.execute(
                update(JobNode)
                .where(JobNode.job_id == job_id, JobNode.node_rank == node_rank)
                .values(status="cancelled")
            )
            return None
        if job.status == "queued":
            job.status = "running"
            job.started_at = job.started_at or now
        return Claim(job.spec, job.attempts, job.step_index, job.nnodes)


def record_started(ctx: Context, job_id: str, node_rank: int, pgid: int) -> None:
    """The stage's process group, for the reaper and for a cancel from another process."""
    with ctx.db.session() as s:
        s.execute(
            update(JobNode)
            .where(JobNode.job_id == job_id, JobNode.node_rank == node_rank)
            .values(pgid=pgid, host=ctx.settings.host, heartbeat_at=time.time())
        )


def heartbeat(ctx: Context, job_id: str, node_rank: int) -> Periodic:
    """A thread stamping the node's heartbeat every `heartbeat_interval` s while it runs."""

    def stamp() -> None:
        with ctx.db.session() as s:
            s.execute(
                update(JobNode)
                .where(JobNode.job_id == job_id, JobNode.node_rank == node_rank, JobNode.status == "running")
                .values(heartbeat_at=time.time())
            )

    return Periodic(f"heartbeat-{job_id}", ctx.settings.heartbeat_interval, stamp)


def finish_node(
    db: Database,
    job_id: str,
    node_rank: int,
    worker: str,
    attempt: int,
    status: str,
    error: str | None,
    log_tail: str | None,
) -> None:
    """Record a node's end; the job ends at its first failed node, or when every node has ended."""
    now = time.time()
    with db.session() as s:
        # Write first: on SQLite that takes the write lock before we read the other nodes. Only
        # this worker's claim is closed: after a re-queue the row may belong to another worker.
        s.execute(
            update(JobNode)
            .where(
                JobNode.job_id == job_id,
                JobNode.node_rank == node_rank,
                JobNode.status == "running",
                JobNode.worker == worker,
            )
            .values(status=status, error=error)
        )
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.status in TERMINAL or job.attempts != attempt:
            return
        if status == "failed":
            job.status, job.error, job.log_tail, job.finished_at = "failed", error, log_tail, now
            return
        states = s.scalars(select(JobNode.status).where(JobNode.job_id == job_id)).all()
        if all(st in TERMINAL for st in states):
            job.status = "cancelled" if job.cancel_requested or "cancelled" in states else "succeeded"
            job.finished_at = now
            if job.status == "succeeded":
                job.step_index, job.error = len(job.spec["steps"]) - 1, None


def requeue_interrupted(ctx: Context, job_id: str, node_rank: int, attempt: int) -> None:
    """A node stopped by its worker's shutdown: the job goes back to the queue as a new attempt
    (from the step that was cut off), unless it was cancelled, ended or moved on meanwhile."""
    with ctx.db.session() as s:
        s.execute(
            update(JobNode)
            .where(
                JobNode.job_id == job_id,
                JobNode.node_rank == node_rank,
                JobNode.status == "running",
                JobNode.worker == ctx.name,
            )
            .values(status="queued", pgid=None, heartbeat_at=None)
        )
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.status in TERMINAL or job.attempts != attempt:
            return
        if job.cancel_requested:
            job.status, job.finished_at = "cancelled", time.time()
            return
        job.attempts += 1
        job.status = "queued"
        job.error = (
            f"queued again (attempt {job.attempts + 1}): worker {ctx.name} shut down during step "
            f"{job.step_index + 1} ({job.current_stage})"
        )
        for node in job.nodes:
            node.status, node.pgid, node.heartbeat_at = "queued", None, None
        new_attempt, nnodes = job.attempts, job.nnodes
    try:
        enqueue_job(ctx.settings, ctx.redis, job_id, nnodes, new_attempt)
    except Exception:
        # The reaper queues a queued node's missing task again once Redis answers.
        log.exception("job %s: could not queue it again", job_id)
    log.warning("job queued again: worker %s shut down", ctx.name, extra={"job_id": job_id})
