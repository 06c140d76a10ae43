"""The Redis side of the trainer: RQ tasks (one per node of a job) and cancel flags.

RQ keeps its own `rq:` keys; everything else the trainer stores in Redis sits under the
`redis_prefix` setting. Tasks are serialised as JSON (RQ's default would be pickle).

A multi-node job's tasks go to a queue of their own (`<queue_name>:multi-node`), which only
workers with the ray executor drain: Ray places and runs the job's nodes as one gang
(`trainer.ray_executor`), so a worker that cannot do that never takes one.
"""

from __future__ import annotations

from redis import Redis
from rq import Queue
from rq.exceptions import NoSuchJobError
from rq.job import Job as RqJob
from rq.serializers import JSONSerializer

from trainer.settings import Settings

TASK = "trainer.worker.run_node"
MULTI_NODE_SUFFIX = ":multi-node"


def make_queue(settings: Settings, redis: Redis, multi_node: bool = False) -> Queue:
    """The queue of one-node jobs, or (`multi_node`) the one of jobs with nnodes > 1."""
    name = settings.queue_name + (MULTI_NODE_SUFFIX if multi_node else "")
    return Queue(name, connection=redis, serializer=JSONSerializer)


def task_id(job_id: str, node_rank: int, attempt: int) -> str:
    return f"{job_id}-n{node_rank}-a{attempt}"


def enqueue_job(
    settings: Settings, redis: Redis, job_id: str, nnodes: int, attempt: int, ranks: list[int] | None = None
) -> list[str]:
    """Queue one task per node of a job (or of the given `ranks`), in one Redis transaction (a
    multi-node job is queued whole)."""
    queue = make_queue(settings, redis, multi_node=nnodes > 1)
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
    return make_queue(settings, redis).count + make_queue(settings, redis, multi_node=True).count


def _key(settings: Settings, *parts: str) -> str:
    return settings.redis_prefix + ":".join(parts)


def request_cancel(settings: Settings, redis: Redis, job_id: str) -> None:
    redis.set(_key(settings, "cancel", job_id), "1", ex=30 * 24 * 3600)


def cancel_requested(settings: Settings, redis: Redis, job_id: str) -> bool:
    return bool(redis.exists(_key(settings, "cancel", job_id)))
