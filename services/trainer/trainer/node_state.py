"""A node's rows in the database over its run: the claim that starts it, the heartbeat while it
runs, and its end (finished, retried as a new attempt, or put back on the queue when its worker
shuts down); and each attempt's row (who ran it, how it ended, where its training resumed).

Each write comes before the reads it guards (on SQLite that takes the write lock first), and only
the claiming worker's row is closed: after a re-queue the row may belong to another worker.

The retry policy (`retry_or_fail`, the reaper's too): an attempt that failed for the platform's
reasons (its worker or node lost, a store gone too long) or, when the job sets `retry_on_error`,
for the stage's own error, is followed by a new attempt while fewer than `max_attempts` attempts
failed; an attempt cut off by a worker shutdown does not count. A new attempt starts at the step
that was cut off, and a training stage there resumes from its resumable checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from trainer.db import ATTEMPT_FAILURES, TERMINAL, Job, JobAttempt, JobNode
from trainer.dispatch import enqueue_job
from trainer.node_context import Context
from trainer.outage import retry_store
from trainer.periodic import Periodic

log = logging.getLogger("trainer.worker")  # these lines are the worker's, whichever module writes them


def current_attempt(job: Job) -> JobAttempt:
    """The row of the job's current attempt (made here for a job that has none yet)."""
    number = job.attempts + 1
    for row in job.attempt_rows:
        if row.attempt == number:
            return row
    row = JobAttempt(attempt=number, status="queued")
    job.attempt_rows.append(row)
    return row


def end_attempt(job: Job, status: str, error: str | None, now: float) -> None:
    row = current_attempt(job)
    row.status, row.error, row.finished_at = status, error, now


def requeue(job: Job, reason: str) -> None:
    """Put the job back on the queue as its next attempt (the caller queues its tasks)."""
    job.attempts += 1
    job.status = "queued"
    job.error = f"queued again as attempt {job.attempts + 1}: {reason}"
    for node in job.nodes:
        node.status, node.pgid, node.heartbeat_at = "queued", None, None
    current_attempt(job)


def retry_or_fail(job: Job, outcome: str, reason: str, retryable: bool, now: float) -> bool:
    """End the current attempt as `outcome` (failed or lost); True when the job was re-queued."""
    end_attempt(job, outcome, reason, now)
    failures = sum(row.status in ATTEMPT_FAILURES for row in job.attempt_rows)
    if retryable and failures < job.max_attempts:
        requeue(job, reason)
        return True
    if retryable and job.max_attempts > 1:
        reason = f"{reason} (attempt {job.attempts + 1}; {failures} of {job.max_attempts} attempts failed)"
    job.status, job.error, job.finished_at = "failed", reason, now
    return False


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
        job = s.get(Job, job_id, with_for_update=True)
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
        attempt = current_attempt(job)
        if attempt.status == "queued":
            attempt.status, attempt.started_at = "running", now
        attempt.worker = ", ".join(filter(None, [attempt.worker, ctx.name]))
        return Claim(job.spec, job.attempts, job.step_index, job.nnodes)


def record_resume(ctx: Context, job_id: str, attempt: int, step: int | None) -> None:
    """The training step this attempt's stage resumes from (its resumable checkpoint's)."""

    def write() -> None:
        with ctx.db.session() as s:
            s.execute(
                update(JobAttempt)
                .where(JobAttempt.job_id == job_id, JobAttempt.attempt == attempt + 1)
                .values(resumed_from_step=step)
            )

    retry_store("recording the resumed step", write, ctx.settings.store_outage_limit)


def record_started(ctx: Context, job_id: str, node_rank: int, pgid: int) -> None:
    """The stage's process group, for the reaper and for a cancel from another process."""

    def write() -> None:
        with ctx.db.session() as s:
            s.execute(
                update(JobNode)
                .where(JobNode.job_id == job_id, JobNode.node_rank == node_rank)
                .values(pgid=pgid, host=ctx.settings.host, heartbeat_at=time.time())
            )

    retry_store("recording the stage's process group", write, ctx.settings.store_outage_limit)


def heartbeat(ctx: Context, job_id: str, node_rank: int) -> Periodic:
    """A thread stamping the node's heartbeat every `heartbeat_interval` s while it runs; a stamp
    that meets an unreachable or locked database is retried until the next one is due (the
    heartbeat limit leaves room for several missed ones, see `Settings`)."""

    def write() -> None:
        with ctx.db.session() as s:
            s.execute(
                update(JobNode)
                .where(JobNode.job_id == job_id, JobNode.node_rank == node_rank, JobNode.status == "running")
                .values(heartbeat_at=time.time())
            )

    def stamp() -> None:
        retry_store(f"heartbeat of job {job_id} node {node_rank}", write, ctx.settings.heartbeat_interval)

    return Periodic(f"heartbeat-{job_id}", ctx.settings.heartbeat_interval, stamp)


def finish_node(
    ctx: Context,
    job_id: str,
    node_rank: int,
    attempt: int,
    status: str,
    error: str | None,
    log_tail: str | None,
    infrastructure: bool = False,
) -> None:
    """Record a node's end; the job ends (or, by its retry policy, is queued again) at its first
    failed node, or ends when every node has ended."""
    now = time.time()
    with ctx.db.session() as s:
        # Write first: on SQLite that takes the write lock before we read the other nodes. Only
        # this worker's claim is closed: after a re-queue the row may belong to another worker.
        s.execute(
            update(JobNode)
            .where(
                JobNode.job_id == job_id,
                JobNode.node_rank == node_rank,
                JobNode.status == "running",
                JobNode.worker == ctx.name,
            )
            .values(status=status, error=error)
        )
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.status in TERMINAL or job.attempts != attempt:
            return
        if status == "failed":
            job.log_tail = log_tail
            retried = retry_or_fail(job, "failed", error or "failed", infrastructure or job.retry_on_error, now)
            if not retried:
                return
            new_attempt, nnodes = job.attempts, job.nnodes
        else:
            _maybe_finished(s, job, now)
            return
    _enqueue_again(ctx, job_id, nnodes, new_attempt, error or "failed")


def _maybe_finished(s: Session, job: Job, now: float) -> None:
    states = s.scalars(select(JobNode.status).where(JobNode.job_id == job.id)).all()
    if all(st in TERMINAL for st in states):
        job.status = "cancelled" if job.cancel_requested or "cancelled" in states else "succeeded"
        job.finished_at = now
        if job.status == "succeeded":
            job.step_index, job.error = len(job.spec["steps"]) - 1, None
        end_attempt(job, job.status, job.error, now)


def requeue_interrupted(ctx: Context, job_id: str, node_rank: int, attempt: int) -> None:
    """A node stopped by its worker's shutdown: the job goes back to the queue as a new attempt
    (from the step that was cut off), unless it was cancelled, ended or moved on meanwhile."""
    now = time.time()
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
            job.status, job.finished_at = "cancelled", now
            end_attempt(job, "cancelled", None, now)
            return
        reason = f"worker {ctx.name} shut down during step {job.step_index + 1} ({job.current_stage})"
        end_attempt(job, "interrupted", reason, now)
        requeue(job, reason)
        new_attempt, nnodes = job.attempts, job.nnodes
    _enqueue_again(ctx, job_id, nnodes, new_attempt, reason)


def _enqueue_again(ctx: Context, job_id: str, nnodes: int, attempt: int, reason: str) -> None:
    try:
        enqueue_job(ctx.settings, ctx.redis, job_id, nnodes, attempt)
    except Exception:
        # The reaper queues a queued node's missing task again once Redis answers.
        log.exception("job %s: could not queue it again", job_id)
    log.warning("job queued again (attempt %d): %s", attempt + 1, reason, extra={"job_id": job_id})
