"""The per-host reaper: finds running job nodes whose worker stopped sending heartbeats.

A thread of every worker and of the API. For a node on this host whose heartbeat is older than
`heartbeat_limit`, it kills the job's processes on this host (torchrun's group, and every process
carrying the job's marker variable; a recycled group id is never hit, see `trainer.procs`) and then fails the job, or re-queues it
while `requeue_on_worker_loss` allows. A node on another host is left to that host's reaper
for three heartbeat limits; after that its host is taken as gone and the job is ended anyway,
so no job is ever left `running`.

It also finds queued nodes whose task is gone from Redis (a flushed or restarted Redis) and
queues their task again, so no job is ever left `queued` with nothing to run it: a second
delivery of a task is harmless, the worker claims a node only while it is still queued.
"""

from __future__ import annotations

import logging
import time

from redis import Redis
from sqlalchemy import select, update

from trainer.db import TERMINAL, Database, Job, JobNode
from trainer.dispatch import enqueue_job, lost_tasks
from trainer.periodic import Periodic
from trainer.procs import node_tag, terminate_job
from trainer.settings import Settings

log = logging.getLogger("trainer.reaper")

FOREIGN_HOST_FACTOR = 3


class Reaper(Periodic):
    def __init__(self, settings: Settings, db: Database, redis: Redis):
        super().__init__("reaper", settings.reap_interval, self.reap_once)
        self.settings, self.db, self.redis = settings, db, redis

    def reap_once(self) -> list[str]:
        """One scan; returns the ids of the jobs it ended or re-queued."""
        return self._reap_running() + self._requeue_lost_tasks()

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
                select(
                    JobNode.job_id, JobNode.node_rank, JobNode.host, JobNode.pgid, JobNode.worker, JobNode.heartbeat_at
                ).where(JobNode.status == "running", JobNode.heartbeat_at < now - limit)
            ).all()
        handled = []
        for job_id, rank, host, pgid, worker, beat in stale:
            age = now - beat
            if host == self.settings.host:
                terminate_job(pgid, node_tag(job_id, rank), self.settings.cancel_grace)
                if self.settings.executor == "docker":
                    self._stop_containers(node_tag(job_id, rank))
                reason = (
                    f"worker {worker} on {host} stopped sending heartbeats ({age:.0f} s ago, limit "
                    f"{limit:g} s); its processes were killed"
                )
            elif age > FOREIGN_HOST_FACTOR * limit:
                reason = (
                    f"worker {worker} on {host} stopped sending heartbeats ({age:.0f} s ago) and no "
                    f"reaper on {host} ended it; the host is taken as gone"
                )
            else:
                continue
            if self._lost(job_id, rank, beat, reason):
                handled.append(job_id)
        return handled

    def _stop_containers(self, tag: str) -> None:
        """A container outlives its worker: stop it by its tag label. An unreachable engine must
        not keep the job running, so it is logged and the job is ended all the same."""
        from trainer.docker_executor import EngineUnavailable, stop_containers

        try:
            stop_containers(self.settings, tag, self.settings.cancel_grace)
        except EngineUnavailable as e:
            log.warning("containers of %s not stopped: %s", tag, e)

    def _lost(self, job_id: str, rank: int, beat: float, reason: str) -> bool:
        with self.db.session() as s:
            # Only the reaper that flips the node first acts (API and workers reap side by side).
            claimed = s.execute(
                update(JobNode)
                .where(
                    JobNode.job_id == job_id,
                    JobNode.node_rank == rank,
                    JobNode.status == "running",
                    JobNode.heartbeat_at == beat,
                )
                .values(status="failed", error=reason)
            ).rowcount
            if not claimed:
                return False
            job = s.get(Job, job_id, with_for_update=True)
            if job.status in TERMINAL:
                return True
            if job.cancel_requested:
                job.status, job.finished_at = "cancelled", time.time()
                return True
            if job.attempts < self.settings.requeue_on_worker_loss:
                job.attempts += 1
                job.status, job.error = "queued", f"re-queued (attempt {job.attempts + 1}): {reason}"
                for node in job.nodes:
                    node.status, node.pgid, node.heartbeat_at = "queued", None, None
                attempt, nnodes = job.attempts, job.nnodes
            else:
                job.status, job.error, job.finished_at = "failed", reason, time.time()
                log.warning("job failed: %s", reason, extra={"job_id": job_id})
                return True
        enqueue_job(self.settings, self.redis, job_id, nnodes, attempt)
        log.warning("job re-queued: %s", reason, extra={"job_id": job_id})
        return True
