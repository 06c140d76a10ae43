"""The jobs API (FastAPI): submit, list, inspect, follow and cancel training jobs.

    python -m trainer api        # or: uvicorn --factory trainer.api:create_app

Every route answers under `/v1/...` (canonical, in the OpenAPI document at /docs) and under the
bare path (`POST /jobs`, `GET /jobs/{id}`, ...), the spelling the mission uses. Writes need
`Authorization: Bearer <TRAINER_WRITE_TOKEN>`. Logs and events stream as SSE whose event ids are
byte offsets into the job's files, so a client that reconnects with `Last-Event-ID` loses nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse
from nanochat.stages.options import PIPELINES, PRESETS
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from redis import Redis
from service_kit import logs
from service_kit.app import create_app as create_service_app
from service_kit.auth import AuthFirstRoute, Tokens, require_write
from service_kit.ops import Readiness, probe
from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError

from trainer.db import STATUSES, TERMINAL, Database, Job, JobNode, migrate
from trainer.dispatch import cancel_tasks, enqueue_job, queue_depth, request_cancel
from trainer.reaper import Reaper
from trainer.registry import Registry, RegistryUnavailable, VersionNotFound, make_registry
from trainer.schemas import (ACCEPTED_INPUTS, JobOut, JobPage, JobRequest, MetricsOut, NodeOut, OptionsInvalid,
                             StagesOut, StepOut, first_input_stage, job_option_schemas, plan_steps)
from trainer.settings import Settings, get_settings
from trainer.worker import events_path, log_path

log = logging.getLogger("trainer.api")

DURATION_BUCKETS = (10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)
SSE_POLL_S = 0.2
SSE_CHUNK = 64 * 1024


class State:
    def __init__(self, settings: Settings, registry: Registry | None):
        self.settings = settings
        self.db = Database(settings.database_url)
        self.redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.registry = registry or make_registry(settings)
        self.reaper = Reaper(settings, self.db, self.redis)


def _state(request: Request) -> State:
    return request.app.state.trainer


StateDep = Annotated[State, Depends(_state)]


def _job_url(request: Request, job_id: str) -> str:
    return str(request.url_for("get_job", job_id=job_id))


def _progress(job: Job) -> float:
    if job.status == "succeeded":
        return 100.0
    n = max(1, len(job.spec["steps"]))
    within = (job.step or 0) / job.total if job.total else 0.0
    return round(100.0 * (job.step_index + min(1.0, within)) / n, 2)


def job_out(request: Request, job: Job) -> JobOut:
    spec = job.spec
    return JobOut(
        id=job.id, url=_job_url(request, job.id), status=job.status, stage=spec.get("stage"),
        pipeline=spec.get("pipeline"), preset=spec.get("preset"),
        steps=[StepOut(stage=s["stage"], options=s["options"]) for s in spec["steps"]],
        step_index=job.step_index, current_stage=job.current_stage, step=job.step, total=job.total,
        progress=_progress(job), eta_s=job.eta_s, metrics=job.metrics or {}, produced=job.produced or [],
        input=spec.get("input"), output_name=spec["output_name"], resources=spec["resources"], error=job.error,
        log_tail=job.log_tail, attempts=job.attempts, cancel_requested=job.cancel_requested,
        created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
        nodes=[NodeOut(node_rank=n.node_rank, status=n.status, host=n.host, pgid=n.pgid,
                       heartbeat_at=n.heartbeat_at, error=n.error) for n in job.nodes],
    )


def _load(state: State, job_id: str) -> Job:
    with state.db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        job.nodes  # loaded now: the session closes before the response is built
        return job


def _resolve_input(state: State, body: JobRequest, steps: list[dict[str, Any]]) -> dict[str, Any] | None:
    expected = first_input_stage(steps)
    if body.input is None:
        if expected is not None:
            raise RequestValidationError([{"loc": ["body", "input"], "type": "missing",
                                           "msg": f"this job reads a {expected} model first: give input "
                                                  "{name, version | alias | stage}"}])
        return None
    if expected is None:
        raise RequestValidationError([{"loc": ["body", "input"], "type": "unexpected",
                                       "msg": "this job reads no input model (it makes what it reads)"}])
    spec = body.input
    try:
        found = state.registry.resolve(spec.name, version=spec.version, alias=spec.alias, stage=spec.stage)
    except VersionNotFound as e:
        raise HTTPException(404, f"input model not found: {e}") from None
    except RegistryUnavailable as e:
        raise HTTPException(503, f"the registry cannot be reached to resolve the input: {e}") from None
    if found.stage not in ACCEPTED_INPUTS[expected]:
        raise RequestValidationError([{"loc": ["body", "input"], "type": "wrong_stage",
                                       "msg": f"{found.name}:{found.version} is a {found.stage} version; this "
                                              f"job needs {' or '.join(sorted(ACCEPTED_INPUTS[expected]))}"}])
    return {"name": found.name, "version": found.version, "stage": found.stage}


def _sse_tail(state: State, job_id: str, path: Path, start: int, request: Request, lines: bool) -> AsyncIterator[str]:
    """SSE over a growing file: each event carries whole lines and its id is the byte offset
    after them; ends (event `end`) once the job is over and the file is read to its end."""

    async def stream() -> AsyncIterator[str]:
        pos = start
        while True:
            ended = (await asyncio.to_thread(_load, state, job_id)).status in TERMINAL
            chunk = await asyncio.to_thread(_read_from, path, pos, SSE_CHUNK)
            cut = chunk.rfind(b"\n") + 1
            if cut == 0 and ended and len(chunk) < SSE_CHUNK:
                cut = len(chunk)
            if cut:
                body = chunk[:cut]
                for piece in body.splitlines(keepends=True) if lines else [body]:
                    pos += len(piece)
                    text = piece.decode("utf-8", "replace").rstrip("\r\n")
                    if lines and not text.strip():
                        continue
                    data = "\n".join(f"data: {ln}" for ln in text.split("\n"))
                    yield f"id: {pos}\n{data}\n\n"
                continue
            if ended:
                yield f"id: {pos}\nevent: end\ndata: {json.dumps({'offset': pos})}\n\n"
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(SSE_POLL_S)

    return stream()


def _read_from(path: Path, offset: int, size: int = -1) -> bytes:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(size)
    except FileNotFoundError:
        return b""


def _start_offset(offset: int, last_event_id: str | None) -> int:
    if last_event_id is None:
        return offset
    try:
        value = int(last_event_id)
    except ValueError:
        raise HTTPException(400, f"Last-Event-ID must be a byte offset, got {last_event_id!r}") from None
    if value < 0:
        raise HTTPException(400, "Last-Event-ID must not be negative")
    return value


def _read_events(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


router = APIRouter(route_class=AuthFirstRoute)


@router.get("/stages", response_model=StagesOut)
def list_stages() -> StagesOut:
    """Every stage with its option JSON Schema and the registry stage of the input it expects."""
    return StagesOut(stages=job_option_schemas(), pipelines=PIPELINES, presets=sorted(PRESETS))


@router.post("/jobs", status_code=202, response_model=JobOut, dependencies=[require_write])
def submit_job(body: JobRequest, request: Request, state: StateDep, response: Response,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobOut:
    """Queue a stage or a pipeline; 202 with the job and its URL (`Location`)."""
    request_hash = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    if idempotency_key:
        with state.db.session() as s:
            existing = s.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
            if existing is not None:
                return _replay(request, state, existing.id, request_hash, response)
    try:
        steps = plan_steps(body)
    except OptionsInvalid as e:
        raise RequestValidationError(e.errors) from None
    resolved = _resolve_input(state, body, steps)
    nnodes = body.resources.nnodes
    job_id = uuid.uuid4().hex
    spec = {"stage": body.stage, "pipeline": body.pipeline, "preset": body.preset, "steps": steps,
            "input": resolved, "output_name": body.output_name, "resources": body.resources.model_dump()}
    try:
        with state.db.session() as s:
            job = Job(id=job_id, status="queued", spec=spec, idempotency_key=idempotency_key,
                      request_hash=request_hash, nnodes=nnodes, created_at=time.time(), step_index=0,
                      current_stage=steps[0]["stage"], metrics={}, produced=[], attempts=0,
                      cancel_requested=False)
            job.nodes = [JobNode(node_rank=r, status="queued") for r in range(nnodes)]
            s.add(job)
    except IntegrityError:
        with state.db.session() as s:
            existing = s.scalar(select(Job).where(Job.idempotency_key == idempotency_key))
        return _replay(request, state, existing.id, request_hash, response)
    try:
        enqueue_job(state.settings, state.redis, job_id, nnodes, attempt=0)
    except Exception as e:
        with state.db.session() as s:
            s.execute(update(Job).where(Job.id == job_id).values(
                status="failed", error=f"could not queue the job: {e}", finished_at=time.time()))
        raise HTTPException(503, f"the job queue (Redis) is unavailable: {e}") from None
    log.info("job queued", extra={"job_id": job_id})
    response.headers["Location"] = _job_url(request, job_id)
    return job_out(request, _load(state, job_id))


def _replay(request: Request, state: State, job_id: str, request_hash: str, response: Response) -> JobOut:
    job = _load(state, job_id)
    if job.request_hash != request_hash:
        raise HTTPException(409, "this Idempotency-Key was used with a different request")
    response.headers["Location"] = _job_url(request, job_id)
    return job_out(request, job)


@router.get("/jobs", response_model=JobPage)
def list_jobs(request: Request, state: StateDep,
              status: Annotated[str | None, Query(pattern="^(" + "|".join(STATUSES) + ")$")] = None,
              limit: Annotated[int, Query(ge=1, le=200)] = 50,
              offset: Annotated[int, Query(ge=0)] = 0) -> JobPage:
    """Jobs, newest first, optionally of one status."""
    with state.db.session() as s:
        query = select(Job)
        count = select(func.count()).select_from(Job)
        if status:
            query, count = query.where(Job.status == status), count.where(Job.status == status)
        jobs = s.scalars(query.order_by(Job.created_at.desc()).limit(limit).offset(offset)).all()
        for job in jobs:
            job.nodes
        total = s.scalar(count)
    return JobPage(items=[job_out(request, j) for j in jobs], total=total, limit=limit, offset=offset)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, request: Request, state: StateDep) -> JobOut:
    """Status, progress, ETA, latest metrics, versions produced, error."""
    return job_out(request, _load(state, job_id))


@router.get("/jobs/{job_id}/logs", response_model=None, responses={200: {"content": {"text/plain": {}, "text/event-stream": {}}}})
def job_logs(job_id: str, request: Request, state: StateDep,
             offset: Annotated[int, Query(ge=0)] = 0, follow: bool = False,
             node: Annotated[int, Query(ge=0, le=63)] = 0,
             last_event_id: Annotated[str | None, Header()] = None) -> Response:
    """The node's log from byte `offset`; `follow=true` streams it as SSE (ids are byte offsets)."""
    job = _load(state, job_id)
    if node >= job.nnodes:
        raise HTTPException(404, f"job {job_id} has {job.nnodes} node(s)")
    path = log_path(state.settings, job_id, node)
    start = _start_offset(offset, last_event_id)
    if follow:
        return StreamingResponse(_sse_tail(state, job_id, path, start, request, lines=False),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    data = _read_from(path, start)
    return PlainTextResponse(data.decode("utf-8", "replace"), headers={"X-Next-Offset": str(start + len(data))})


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}})
def job_events(job_id: str, request: Request, state: StateDep, offset: Annotated[int, Query(ge=0)] = 0,
               last_event_id: Annotated[str | None, Header()] = None) -> StreamingResponse:
    """The stages' JSON events as SSE, one event per line; ids are byte offsets."""
    _load(state, job_id)
    start = _start_offset(offset, last_event_id)
    return StreamingResponse(_sse_tail(state, job_id, events_path(state.settings, job_id), start, request, lines=True),
                             media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


@router.get("/jobs/{job_id}/metrics", response_model=MetricsOut)
def job_metrics(job_id: str, state: StateDep, stage: str | None = None) -> MetricsOut:
    """Time series for plots: `{"series": {"loss": [[step, value], ...], ...}}` of one stage: the
    one named by `stage`, else the pipeline's current stage, or, when that one draws no loss curve
    (an eval, the report), the last stage that did, so a finished speedrun still shows a curve.
    `stages` lists every stage with a loss curve, for a picker."""
    job = _load(state, job_id)
    by_stage: dict[str, dict[str, list[tuple[float, float]]]] = {}
    last_step: dict[str, float] = {}
    trained: list[str] = []  # stages whose progress carries a loss, in the order they first reported
    for event in _read_events(events_path(state.settings, job_id)):
        name = event.get("stage")
        series = by_stage.setdefault(name, {})
        if event.get("type") == "progress":
            last_step[name] = event["step"]
            if name not in trained and isinstance(event.get("loss"), (int, float)):
                trained.append(name)
            for key in ("loss", "lr", "tok_per_s", "mfu", "eta_s"):
                if isinstance(event.get(key), (int, float)):
                    series.setdefault(key, []).append((last_step[name], event[key]))
        elif event.get("type") == "eval" and isinstance(event.get("value"), (int, float)):
            series.setdefault(event["name"], []).append((last_step.get(name, 0), event["value"]))
    if stage is None:
        stage = job.current_stage
        if stage not in trained and trained:
            stage = trained[-1]
    return MetricsOut(stage=stage, series=by_stage.get(stage, {}), stages=trained)


@router.post("/jobs/{job_id}/cancel", status_code=202, response_model=JobOut, dependencies=[require_write])
def cancel_job(job_id: str, request: Request, state: StateDep) -> JobOut:
    """Cancel: a queued job ends at once; a running one gets SIGTERM to its process group, a grace
    period, then SIGKILL, and is `cancelled` once no process of it is left."""
    job = _load(state, job_id)
    if job.status in TERMINAL:
        raise HTTPException(409, f"job {job_id} is already {job.status}")
    request_cancel(state.settings, state.redis, job_id)
    with state.db.session() as s:
        s.execute(update(Job).where(Job.id == job_id).values(cancel_requested=True))
        dequeued = s.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(
            status="cancelled", finished_at=time.time())).rowcount
        if dequeued:
            s.execute(update(JobNode).where(JobNode.job_id == job_id, JobNode.status == "queued")
                      .values(status="cancelled"))
    if dequeued:
        cancel_tasks(state.settings, state.redis, job_id, job.nnodes, job.attempts)
    return job_out(request, _load(state, job_id))


class JobCollector:
    """Prometheus metrics read from the job records and the queue at scrape time, so every API
    replica reports the same numbers whichever worker ran the jobs."""

    def __init__(self, state: State):
        self.state = state

    def collect(self) -> Iterator[Any]:
        depth = GaugeMetricFamily("trainer_queue_depth", "Tasks waiting in the RQ queue.")
        try:
            depth.add_metric([], queue_depth(self.state.settings, self.state.redis))
        except Exception:
            depth.add_metric([], float("nan"))
        yield depth
        by_status = GaugeMetricFamily("trainer_jobs", "Jobs by status.", labels=["status"])
        durations = HistogramMetricFamily("trainer_job_duration_seconds", "Run time of ended jobs by outcome.",
                                          labels=["outcome"])
        with self.state.db.session() as s:
            counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            rows = s.execute(select(Job.status, Job.finished_at - func.coalesce(Job.started_at, Job.created_at))
                             .where(Job.status.in_(TERMINAL), Job.finished_at.is_not(None))).all()
        for status in STATUSES:
            by_status.add_metric([status], counts.get(status, 0))
        yield by_status
        running = GaugeMetricFamily("trainer_running_jobs", "Jobs running now.")
        running.add_metric([], counts.get("running", 0))
        yield running
        for outcome in TERMINAL:
            values = [max(0.0, d) for st, d in rows if st == outcome]
            buckets = [(str(b), sum(v <= b for v in values)) for b in DURATION_BUCKETS] + [("+Inf", len(values))]
            durations.add_metric([outcome], buckets, sum(values))
        yield durations


def readiness(request: Request) -> Readiness:
    state = _state(request)
    return Readiness({"database": probe(state.db.ping), "redis": probe(state.redis.ping),
                      "registry": probe(state.registry.ping)})


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = CollectorRegistry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        migrate(settings.database_url)
        state = State(settings, registry)
        app.state.trainer = state
        state.reaper.start()
        jobs = JobCollector(state)
        metrics.register(jobs)
        yield
        metrics.unregister(jobs)
        state.reaper.stop()
        state.db.engine.dispose()

    tokens = Tokens(write_token=settings.write_token,
                    no_write_token="writes are disabled: the server has no TRAINER_WRITE_TOKEN")
    app = create_service_app("trainer", tokens=tokens, readiness=readiness, metrics=metrics,
                             max_body_bytes=settings.max_body_bytes, title="nanochat trainer", version="0.1.0",
                             lifespan=lifespan, description="Launch and watch nanochat training jobs: stages and "
                             "pipelines run under torchrun.")
    # The bare paths are the mission's spelling (`POST /jobs`); /v1 is canonical and documented.
    app.include_router(router, prefix="/v1")
    app.include_router(router, include_in_schema=False)
    return app


def main() -> None:
    import uvicorn

    settings = get_settings()
    logs.configure(settings.log_level)
    uvicorn.run(create_app(settings), host=settings.api_host, port=settings.api_port, log_config=None,
                access_log=False)
