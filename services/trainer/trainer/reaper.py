"""The per-host reaper: finds running job nodes whose worker stopped sending heartbeats.

A thread of every worker and of the API; on each host only one of them acts at a time, the holder
of the host's lease (a Redis lock it renews every scan; another takes over once it expires).
For a node on this host whose heartbeat is older than `heartbeat_limit`, it first claims the node
(marks it `lost` in one conditional update), so a heartbeat that arrives meanwhile keeps the job
and its processes; then it kills the job's processes on this host (torchrun's group, and every
process carrying the job's marker variable; a recycled group id is never hit, see
`trainer.procs`); and only then moves the job on: a new attempt while its retry policy allows
(queued now, so it never meets the old one's processes), else failed. A node left `lost` by a
reaper that died half-way is settled by the next scan. A node on another
host is left to that host's reaper for three heartbeat limits; after that its host is taken as
gone and the job is ended or retried anyway, so no job is ever left `running`.

It also finds queued nodes whose task is gone from Redis (a flushed or restarted Redis) and
queues their task again, so no job is ever left `queued` with nothing to run it: a second
delivery of a task is harmless, the worker claims a node only while it is still queued.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from redis import Redis
from redis.exceptions import LockError
from sqlalchemy import select, update

from trainer.db import TERMINAL, Database, Job, JobNode
from trainer.dispatch import enqueue_job, lost_tasks
from trainer.node_state import end_attempt, retry_or_fail
from trainer.periodic import Periodic
from trainer.procs import node_tag, terminate_job
from trainer.settings import Settings

log = logging.getLogger("trainer.reaper")

FOREIGN_HOST_FACTOR = 3


@dataclass(frozen=True)
class Taken:
    """A lost node this reaper claimed: `retry` is the new attempt to queue, (nnodes, attempt),
    or None when the job ended."""

    retry: tuple[int, int] | None


class Reaper(Periodic):
    def __init__(self, settings: Settings, db: Database, redis: Redis):
        super().__init__("reaper", settings.reap_interval, self.reap_once)
        self.settings, self.db, self.redis = settings, db, redis
        # Long enough to outlast a slow scan, short enough that a dead holder is replaced soon.
        self.lease = redis.lock(
            f"{settings.redis_prefix}reaper:{settings.host}",
            timeout=3 * settings.reap_interval + 5,
            blocking=False,
            thread_local=False,
        )

    def reap_once(self) -> list[str]:
        """One scan, if this reaper holds its host's lease; returns the ids of the jobs it ended
        or re-queued."""
        if not self.leads():
            return []
        return self._reap_running() + self._requeue_lost_tasks()

    def leads(self) -> bool:
        """Take or renew this host's lease; False while another reaper holds it."""
        if self.lease.owned():
            try:
                self.lease.reacquire()
                return True
            except LockError:
                pass  # expired between the two calls, maybe taken by another reaper
        return bool(self.lease.acquire(blocking=False))

    def _requeue_lost_tasks(self) -> list[str]:
        # Jobs younger than a heartbeat limit are skipped: the API commits the row before it
        # queues the task, and a re-queue commits before it queues too.
        with self.db.session() as s:
            queued = s.execute(
                select(Job.id, JobNode.node_rank, Job.attempts, Job.nnodes)
                .join(JobNode, JobNode.job_id == Job.id)
                .where(
                    Job.status.in_(("queued", "running")),
                    Job.cancel_requested.is_(False),
                    JobNode.status == "queued",
                    Job.created_at < time.time() - self.settings.heartbeat_limit,
                )
            ).all()
        if not queued:
            return []
        nnodes_of = {job_id: nnodes for job_id, _, _, nnodes in queued}
        lost: dict[tuple[str, int, int], list[int]] = {}
        for job_id, rank, attempt in lost_tasks(
            self.redis, [(job_id, rank, attempt) for job_id, rank, attempt, _ in queued]
        ):
            lost.setdefault((job_id, nnodes_of[job_id], attempt), []).append(rank)
        for (job_id, nnodes, attempt), ranks in lost.items():
            enqueue_job(self.settings, self.redis, job_id, nnodes, attempt, ranks=ranks)
            log.warning("queued again: the task of node(s) %s was gone from Redis", ranks, extra={"job_id": job_id})
        return [job_id for job_id, _, _ in lost]

    def _reap_running(self) -> list[str]:
        now = time.time()
        limit = self.settings.heartbeat_limit
        with self.db.session() as s:
            stale = s.execute(
                select(JobNode.job_id, JobNode.node_rank, JobNode.host, JobNode.worker, JobNode.heartbeat_at).where(
                    JobNode.status == "running", JobNode.heartbeat_at < now - limit
                )
            ).all()
        for job_id, rank, host, worker, beat in stale:
            age = now - beat
            if host == self.settings.host:
                reason = f"worker {worker} on {host} stopped sending heartbeats ({age:.0f} s ago, limit {limit:g} s)"
            elif age > FOREIGN_HOST_FACTOR * limit:
                reason = (
                    f"worker {worker} on {host} stopped sending heartbeats ({age:.0f} s ago) and no "
                    f"reaper on {host} ended it; the host is taken as gone"
                )
            else:
                continue
            self._claim(job_id, rank, beat, reason)
        return self._settle_lost()

    def _claim(self, job_id: str, rank: int, beat: float, reason: str) -> None:
        """Mark the node lost, only if it still is as the scan saw it: a heartbeat that came back
        meanwhile, or another reaper that claimed it first, leaves it alone."""
        with self.db.session() as s:
            s.execute(
                update(JobNode)
                .where(
                    JobNode.job_id == job_id,
                    JobNode.node_rank == rank,
                    JobNode.status == "running",
                    JobNode.heartbeat_at == beat,
                )
                .values(status="lost", error=reason)
            )

    def _settle_lost(self) -> list[str]:
        """Each lost node: its processes on this host killed, then its job moved on (also those a
        reaper claimed before it died); a node on another host has no process here to kill."""
        with self.db.session() as s:
            lost = s.execute(
                select(JobNode.job_id, JobNode.node_rank, JobNode.host, JobNode.pgid, JobNode.error).where(
                    JobNode.status == "lost"
                )
            ).all()
        handled = []
        for job_id, rank, host, pgid, reason in lost:
            if host == self.settings.host:
                self._kill(job_id, rank, pgid)
            taken = self._settle(job_id, rank, reason or "its worker was lost")
            if taken is None:
                continue
            if taken.retry is not None:
                nnodes, attempt = taken.retry
                enqueue_job(self.settings, self.redis, job_id, nnodes, attempt)
                log.warning("job queued again (attempt %d): %s", attempt + 1, reason, extra={"job_id": job_id})
            handled.append(job_id)
        return handled

    def _kill(self, job_id: str, rank: int, pgid: int | None) -> None:
        tag = node_tag(job_id, rank)
        terminate_job(pgid, tag, self.settings.cancel_grace)
        if self.settings.executor == "docker":
            self._stop_containers(tag)

    def _stop_containers(self, tag: str) -> None:
        """A container outlives its worker: stop it by its tag label. An unreachable engine must
        not keep the job running, so it is logged and the job is ended all the same."""
        from trainer.docker_executor import EngineUnavailable, stop_containers

        try:
            stop_containers(self.settings, tag, self.settings.cancel_grace)
        except EngineUnavailable as e:
            log.warning("containers of %s not stopped: %s", tag, e)

    def _settle(self, job_id: str, rank: int, reason: str) -> Taken | None:
        """The job of a lost node whose processes are gone: a new attempt while its retry policy
        allows, else failed (cancelled if asked). None when another reaper settled it first."""
        now = time.time()
        with self.db.session() as s:
            settled = s.execute(
                update(JobNode)
                .where(JobNode.job_id == job_id, JobNode.node_rank == rank, JobNode.status == "lost")
                .values(status="failed")
            ).rowcount
            if not settled:
                return None
            job = s.get(Job, job_id, with_for_update=True)
            if job.status in TERMINAL:
                return Taken(None)
            if job.cancel_requested:
                job.status, job.finished_at = "cancelled", now
                end_attempt(job, "cancelled", None, now)
                return Taken(None)
            if retry_or_fail(job, "lost", reason, True, now):
                return Taken((job.nnodes, job.attempts))
        log.warning("job failed: %s", reason, extra={"job_id": job_id})
        return Taken(None)
