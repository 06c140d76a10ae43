"""The Redis side of the trainer: RQ tasks (one per node of a job), cancel flags, gang barriers.

RQ keeps its own `rq:` keys; everything else the trainer stores in Redis sits under the
`redis_prefix` setting. Tasks are serialised as JSON (RQ's default would be pickle).

Multi-node jobs are a gang: one RQ task per node, and before every step all nodes meet at a
barrier. The first barrier waits `gang_timeout` s at most; whoever decides first sets the
barrier's decision (`go` when the last node arrives, `abort` when a node times out), so the nodes
either all start the step or none does. All nodes pass the job id as torchrun's `--rdzv-id`.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job as RqJob
from rq.serializers import JSONSerializer

from trainer.settings import Settings

TASK = "trainer.worker.run_node"


def make_queue(settings: Settings, redis: Redis) -> Queue:
    return Queue(settings.queue_name, connection=redis, serializer=JSONSerializer)


def task_id(job_id: str, node_rank: int, attempt: int) -> str:
    return f"{job_id}-n{node_rank}-a{attempt}"


def enqueue_job(
    settings: Settings, redis: Redis, job_id: str, nnodes: int, attempt: int, ranks: list[int] | None = None
) -> list[str]:
    """Queue one task per node of a job (or of the given `ranks`), in one Redis transaction (a
    gang is queued whole)."""
    queue = make_queue(settings, redis)
    with redis.pipeline() as pipe:
        ids = []
        for rank in range(nnodes) if ranks is None else ranks:
            rq_job = queue.enqueue_call(
                TASK,
                kwargs={"job_id": job_id, "node_rank": rank},
                timeout=settings.job_timeout,
                result_ttl=24 * 3600,
                failure_ttl=7 * 24 * 3600,
                job_id=task_id(job_id, rank, attempt),
                description=f"trainer job {job_id} node {rank}",
                pipeline=pipe,
            )
            ids.append(rq_job.id)
        pipe.execute()
    return ids


def cancel_tasks(settings: Settings, redis: Redis, job_id: str, nnodes: int, attempt: int) -> None:
    """Take a job's still-queued tasks off the queue (running ones stop through the cancel flag)."""
    for rank in range(nnodes):
        try:
            rq_job = RqJob.fetch(task_id(job_id, rank, attempt), connection=redis, serializer=JSONSerializer)
        except NoSuchJobError:
            continue
        if rq_job.get_status(refresh=True) in ("queued", "deferred", "scheduled"):
            rq_job.cancel()


def lost_tasks(redis: Redis, nodes: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """The (job_id, node_rank, attempt) of `nodes` whose task is gone from Redis (flushed, evicted,
    a restarted Redis without persistence) or ended without running (RQ failed it, e.g. its worker
    died before claiming). One round trip for all of them."""
    found = RqJob.fetch_many([task_id(*node) for node in nodes], connection=redis, serializer=JSONSerializer)
    return [
        node
        for node, rq_job in zip(nodes, found)
        if rq_job is None or rq_job.get_status(refresh=False) in ("failed", "stopped", "canceled")
    ]


def queue_depth(settings: Settings, redis: Redis) -> int:
    return make_queue(settings, redis).count


def _key(settings: Settings, *parts: str) -> str:
    return settings.redis_prefix + ":".join(parts)


def request_cancel(settings: Settings, redis: Redis, job_id: str) -> None:
    redis.set(_key(settings, "cancel", job_id), "1", ex=30 * 24 * 3600)


def cancel_requested(settings: Settings, redis: Redis, job_id: str) -> bool:
    return bool(redis.exists(_key(settings, "cancel", job_id)))


class BarrierAborted(RuntimeError):
    """Not every node of a gang arrived in time, or the job ended while nodes waited."""


def barrier(
    settings: Settings,
    redis: Redis,
    job_id: str,
    name: str,
    nnodes: int,
    timeout: float,
    should_stop: Callable[[], str | None],
) -> None:
    """Wait until all `nnodes` nodes reached barrier `name` of a job; raise BarrierAborted when
    not all arrive within `timeout` s or `should_stop()` names a reason to give up."""
    joined = _key(settings, "gang", job_id, name, "joined")
    decision = _key(settings, "gang", job_id, name, "decision")
    ttl = int(max(timeout, 60)) + 3600
    count = redis.incr(joined)
    redis.expire(joined, ttl)
    if count >= nnodes:
        redis.set(decision, "go", nx=True, ex=ttl)
    deadline = time.monotonic() + timeout
    while True:
        state = redis.get(decision)
        if state == b"go":
            return
        if state == b"abort":
            raise BarrierAborted(f"the {nnodes} nodes of the job did not all start {name} within {timeout:g} s")
        reason = should_stop()
        if reason:
            redis.set(decision, "abort", nx=True, ex=ttl)
            raise BarrierAborted(reason)
        if time.monotonic() >= deadline:
            redis.set(decision, "abort", nx=True, ex=ttl)
            continue
        time.sleep(0.1)
