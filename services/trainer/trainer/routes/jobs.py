"""Jobs: submit (a stage or a pipeline), list, inspect, follow logs and events, curves, cancel."""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from nanochat_contracts.job_folder import events_path, log_path
from pydantic_core import PydanticSerializationError
from redis.exceptions import RedisError
from service_kit.auth import AuthFirstRoute, require_write
from service_kit.errors import APIError
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from trainer.db import STATUSES, TERMINAL, Job, JobAttempt, JobNode
from trainer.deps import State, StateDep, load_job
from trainer.dispatch import cancel_tasks, enqueue_job, request_cancel
from trainer.option_rules import option_errors, unencodable_at
from trainer.registry import RegistryUnavailable, VersionNotFound
from trainer.schemas import (
    ACCEPTED_INPUTS,
    JobOut,
    JobPage,
    JobRequest,
    MetricsOut,
    NodeOut,
    OptionsInvalid,
    StepOut,
    attempts_out,
    first_input_stage,
    plan_steps,
)
from trainer.tail import MAX_OFFSET, follow, log_window, start_offset

log = logging.getLogger(__name__)
router = APIRouter(prefix="/jobs", route_class=AuthFirstRoute)
# Seconds a client waits before trying again when Redis could not be reached.
REDIS_RETRY_AFTER_S = 5
DEFAULT_LOG_WINDOW, MAX_LOG_WINDOW = 1 << 20, 16 << 20
ByteOffset = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="Byte offset into the file.")]


@router.post("", status_code=202, response_model=JobOut, dependencies=[require_write])
def submit_job(
    body: JobRequest,
    request: Request,
    state: StateDep,
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> JobOut:
    """Queue a stage or a pipeline; 202 with the job and its URL (`Location`)."""
    request_hash = hash_request(body)
    if idempotency_key:
        with state.db.session() as s:
            existing = s.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
            if existing is not None:
                return replay(request, state, existing.id, request_hash, response)
    refuse_multi_node_without_ray(state, body.resources.nnodes)
    try:
        steps = plan_steps(body)
    except OptionsInvalid as e:
        raise RequestValidationError(e.errors) from None
    refused = option_errors(state.settings, steps, per_stage=body.pipeline is not None)
    if refused:
        raise RequestValidationError(refused)
    resolved = resolve_input(state, body, steps)
    nnodes = body.resources.nnodes
    job_id = uuid.uuid4().hex
    spec = {
        "stage": body.stage,
        "pipeline": body.pipeline,
        "preset": body.preset,
        "steps": steps,
        "input": resolved,
        "output_name": body.output_name,
        "resources": body.resources.model_dump(),
    }
    try:
        with state.db.session() as s:
            job = Job(
                id=job_id,
                status="queued",
                spec=spec,
                idempotency_key=idempotency_key,
                request_hash=request_hash,
                nnodes=nnodes,
                created_at=time.time(),
                step_index=0,
                current_stage=steps[0]["stage"],
                metrics={},
                produced=[],
                attempts=0,
                max_attempts=body.max_attempts,
                retry_on_error=body.retry_on_error,
                cancel_requested=False,
            )
            job.nodes = [JobNode(node_rank=r, status="queued") for r in range(nnodes)]
            job.attempt_rows = [JobAttempt(attempt=1, status="queued")]
            s.add(job)
    except IntegrityError:
        with state.db.session() as s:
            existing = s.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
        return replay(request, state, existing.id, request_hash, response)
    queue_or_forget(state, job_id, nnodes)
    log.info("job queued", extra={"job_id": job_id})
    response.headers["Location"] = job_url(request, job_id)
    return job_out(request, load_job(state, job_id))


def hash_request(body: JobRequest) -> str:
    """What an Idempotency-Key replay must match; 422 for a string that is no text."""
    try:
        return hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    except PydanticSerializationError:
        where = unencodable_at(body.model_dump(), ["body"]) or ["body"]
        msg = "holds a lone surrogate (\\ud800-\\udfff), which is no text"
        raise RequestValidationError([{"loc": where, "type": "string_unicode", "msg": msg}]) from None


def refuse_multi_node_without_ray(state: State, nnodes: int) -> None:
    """422 for nnodes > 1 unless this trainer runs such jobs on Ray: no other executor can (their
    queue is drained only by workers with the ray executor), so the job would never start."""
    if nnodes > 1 and state.settings.executor != "ray":
        raise APIError(
            422,
            f"resources.nnodes is {nnodes}: a job on more than one node runs on a Ray cluster, and this trainer's "
            f"executor is {state.settings.executor}; set TRAINER_EXECUTOR=ray on the trainer API and on a worker "
            "that reaches the Ray cluster (TRAINER_RAY_ADDRESS), or ask for nnodes 1",
            code="invalid_value",
            param="resources.nnodes",
        )


def queue_or_forget(state: State, job_id: str, nnodes: int) -> None:
    """Queue the job's tasks; when Redis cannot take them, 503 and the job's rows go (no job was
    made; a task that reached Redis after all finds no job and is dropped), so a retry with the
    same Idempotency-Key makes and queues the job afresh."""
    try:
        enqueue_job(state.settings, state.redis, job_id, nnodes, attempt=0)
    except (RedisError, OSError) as e:
        with state.db.session() as s:
            s.delete(s.get(Job, job_id))
        raise HTTPException(
            503,
            f"the job queue (Redis) is unavailable, no job was made; try again: {e}",
            headers={"Retry-After": str(REDIS_RETRY_AFTER_S)},
        ) from None


def replay(request: Request, state: State, job_id: str, request_hash: str, response: Response) -> JobOut:
    job = load_job(state, job_id)
    if job.request_hash != request_hash:
        raise HTTPException(409, "this Idempotency-Key was used with a different request")
    response.headers["Location"] = job_url(request, job_id)
    return job_out(request, job)


@router.get("", response_model=JobPage)
def list_jobs(
    request: Request,
    state: StateDep,
    status: Annotated[str | None, Query(pattern="^(" + "|".join(STATUSES) + ")$")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> JobPage:
    """Jobs, newest first, optionally of one status."""
    with state.db.session() as s:
        query = select(Job)
        count = select(func.count()).select_from(Job)
        if status:
            query, count = query.where(Job.status == status), count.where(Job.status == status)
        jobs = s.scalars(query.order_by(Job.created_at.desc()).limit(limit).offset(offset)).all()
        for job in jobs:
            _ = job.nodes  # loaded now: the session closes before the response is built
        total = s.scalar(count)
    return JobPage(items=[job_out(request, j) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: str, request: Request, state: StateDep) -> JobOut:
    """Status, progress, ETA, latest metrics, versions produced, error."""
    return job_out(request, load_job(state, job_id))


@router.get(
    "/{job_id}/logs", response_model=None, responses={200: {"content": {"text/plain": {}, "text/event-stream": {}}}}
)
def job_logs(
    job_id: str,
    state: StateDep,
    offset: ByteOffset = 0,
    follow_: Annotated[bool, Query(alias="follow")] = False,
    node: Annotated[int, Query(ge=0, le=63)] = 0,
    limit: Annotated[
        int | None, Query(ge=1, le=MAX_LOG_WINDOW, description="Most bytes a plain read answers (1 MiB by default).")
    ] = None,
    tail: Annotated[
        int | None, Query(ge=1, le=MAX_LOG_WINDOW, description="Answer the last `tail` bytes instead (plain read).")
    ] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """The node's log from byte `offset`, at most `limit` bytes of it (or its last `tail` bytes);
    `X-Next-Offset` is where the next read goes on, `X-Log-Size` the log's size now.
    `follow=true` streams it as SSE instead (ids are byte offsets)."""
    if tail is not None and (offset or follow_):
        raise RequestValidationError(
            [{"loc": ["query", "tail"], "type": "value_error", "msg": "tail reads the end: give no offset or follow"}]
        )
    if limit is not None and follow_:
        raise RequestValidationError(
            [{"loc": ["query", "limit"], "type": "value_error", "msg": "a followed log is streamed whole: no limit"}]
        )
    job = load_job(state, job_id)
    if node >= job.nnodes:
        raise HTTPException(404, f"job {job_id} has {job.nnodes} node(s)")
    path = log_path(state.settings.runs_dir, job_id, node)
    start = start_offset(offset, last_event_id)
    if follow_:
        return follow(state.followers, job_id, path, start, lines=False)
    data, start, size = log_window(path, start, limit or DEFAULT_LOG_WINDOW, tail)
    headers = {"X-Next-Offset": str(start + len(data)), "X-Log-Size": str(size)}
    return Response(data, media_type="text/plain; charset=utf-8", headers=headers)


@router.get("/{job_id}/events", response_class=Response, responses={200: {"content": {"text/event-stream": {}}}})
def job_events(
    job_id: str,
    state: StateDep,
    offset: ByteOffset = 0,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """The stages' JSON events as SSE, one event per line; ids are byte offsets."""
    load_job(state, job_id)
    start = start_offset(offset, last_event_id)
    return follow(state.followers, job_id, events_path(state.settings.runs_dir, job_id), start, lines=True)


@router.get("/{job_id}/metrics", response_model=MetricsOut)
def job_metrics(job_id: str, state: StateDep, stage: Annotated[str | None, Query(max_length=64)] = None) -> Response:
    """Time series for plots: `{"series": {"loss": [[step, value], ...], ...}}` of one stage: the
    one named by `stage`, else the pipeline's current stage, or, when that one draws no loss curve
    (an eval, the report), the last stage that did, so a finished speedrun still shows a curve.
    `stages` lists every stage with a loss curve, for a picker."""
    job = load_job(state, job_id)
    out = state.curves.result(events_path(state.settings.runs_dir, job_id), stage, job.current_stage)
    # Serialised here: FastAPI would validate the points once more against response_model.
    return Response(out.model_dump_json(), media_type="application/json")


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, dependencies=[require_write])
def cancel_job(job_id: str, request: Request, state: StateDep) -> JobOut:
    """Cancel: a queued job ends at once; a running one gets SIGTERM to its process group, a grace
    period, then SIGKILL, and is `cancelled` once no process of it is left.

    The database is written first: the workers' stop checks and the reaper read it, so a cancel
    holds even when Redis (the fast signal, and the queue a queued job leaves) cannot be reached;
    that answers 503, the cancel recorded."""
    job = load_job(state, job_id)
    if job.status in TERMINAL:
        raise HTTPException(409, f"job {job_id} is already {job.status}")
    with state.db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        dequeued = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(status="cancelled", finished_at=time.time())
        ).rowcount
        if dequeued:
            s.execute(
                update(JobNode).where(JobNode.job_id == job_id, JobNode.status == "queued").values(status="cancelled")
            )
    try:
        request_cancel(state.settings, state.redis, job_id)
        if dequeued:
            cancel_tasks(state.settings, state.redis, job_id, job.nnodes, job.attempts)
    except (RedisError, OSError) as e:
        raise HTTPException(
            503,
            f"the cancel of job {job_id} is recorded and its worker will stop it, but Redis could not be "
            f"told at once: {e}",
            headers={"Retry-After": str(REDIS_RETRY_AFTER_S)},
        ) from None
    return job_out(request, load_job(state, job_id))


def job_url(request: Request, job_id: str) -> str:
    return str(request.url_for("get_job", job_id=job_id))


def progress(job: Job) -> float:
    if job.status == "succeeded":
        return 100.0
    n = max(1, len(job.spec["steps"]))
    within = (job.step or 0) / job.total if job.total else 0.0
    return round(100.0 * (job.step_index + min(1.0, within)) / n, 2)


def job_out(request: Request, job: Job) -> JobOut:
    spec = job.spec
    return JobOut(
        id=job.id,
        url=job_url(request, job.id),
        status=job.status,
        stage=spec.get("stage"),
        pipeline=spec.get("pipeline"),
        preset=spec.get("preset"),
        steps=[StepOut(stage=s["stage"], options=s["options"]) for s in spec["steps"]],
        step_index=job.step_index,
        current_stage=job.current_stage,
        step=job.step,
        total=job.total,
        progress=progress(job),
        eta_s=job.eta_s,
        metrics=job.metrics or {},
        produced=job.produced or [],
        input=spec.get("input"),
        output_name=spec["output_name"],
        resources=spec["resources"],
        error=job.error,
        log_tail=job.log_tail,
        attempt=job.attempts + 1,
        max_attempts=job.max_attempts,
        retry_on_error=job.retry_on_error,
        attempts=attempts_out(job),
        cancel_requested=job.cancel_requested,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        nodes=[
            NodeOut(
                node_rank=n.node_rank,
                status=n.status,
                host=n.host,
                pgid=n.pgid,
                heartbeat_at=n.heartbeat_at,
                error=n.error,
            )
            for n in job.nodes
        ],
    )


def resolve_input(state: State, body: JobRequest, steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    expected = first_input_stage(steps)
    if body.input is None:
        if expected is not None:
            raise RequestValidationError(
                [
                    {
                        "loc": ["body", "input"],
                        "type": "missing",
                        "msg": f"this job reads a {expected} model first: give input {{name, version | alias | stage}}",
                    }
                ]
            )
        return None
    if expected is None:
        raise RequestValidationError(
            [
                {
                    "loc": ["body", "input"],
                    "type": "unexpected",
                    "msg": "this job reads no input model (it makes what it reads)",
                }
            ]
        )
    spec = body.input
    try:
        found = state.registry.resolve(spec.name, version=spec.version, alias=spec.alias, stage=spec.stage)
    except VersionNotFound as e:
        raise HTTPException(404, f"input model not found: {e}") from None
    except RegistryUnavailable as e:
        raise HTTPException(503, f"the registry cannot be reached to resolve the input: {e}") from None
    if found.stage not in ACCEPTED_INPUTS[expected]:
        raise RequestValidationError(
            [
                {
                    "loc": ["body", "input"],
                    "type": "wrong_stage",
                    "msg": f"{found.name}:{found.version} is a {found.stage} version; this "
                    f"job needs {' or '.join(sorted(ACCEPTED_INPUTS[expected]))}",
                }
            ]
        )
    return {"name": found.name, "version": found.version, "stage": found.stage}
