"""The worker: an RQ worker whose task runs one node's share of a job, step after step.

    python -m trainer worker            # TRAINER_* settings; runs until SIGTERM or SIGINT

It uses RQ's SimpleWorker (the task runs in the worker process itself, no fork), so the worker's
heartbeat and the job's heartbeat die together: if the worker is SIGKILLed, torchrun's group,
alone in its session, is found by a reaper (`trainer.reaper`, a thread in every worker and in the
API) once the heartbeat is older than `heartbeat_limit`, killed, and the job failed or re-queued.

Per step the node task (`run_node`): meets the other nodes at a barrier (nnodes > 1), fetches the
step's input version from the registry, runs `torchrun -m nanochat.stages.<stage>` with the
step's options as a JSON config, appends the stage's events to `events.jsonl` and its output to
`log-node<r>.txt` in the job folder, then registers what the stage made: each output checkpoint is
uploaded with lineage (retried with backoff; the folder stays on disk when the registry is
unreachable), an eval stage's metrics are patched onto the version it measured, the report's
files are attached to it.

A worker told to stop (SIGTERM or SIGINT: `docker compose stop`, Ctrl-C of `make up`) does not
wait for a stage that may run for hours: it stops the running stage (SIGTERM, `cancel_grace`,
SIGKILL) and puts the job back on the queue as a new attempt that starts again at the step that
was cut off; a training stage that saved a resumable checkpoint continues from it (`--resume`).
A second signal is RQ's cold stop; the stage is still stopped on the way out.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis import Redis
from rq import SimpleWorker
from rq.serializers import JSONSerializer
from sqlalchemy import select, update

from nanochat.report import EVAL_FILE
from nanochat.stages.options import resumable, resume_dir

from trainer.db import TERMINAL, Database, Job, JobNode, migrate
from trainer.dispatch import BarrierAborted, barrier, cancel_requested, enqueue_job, make_queue
from trainer.procs import JOB_MARKER, node_tag
from trainer.reaper import Reaper
from trainer.registry import Registry, RegistryRejected, RegistryUnavailable, VersionNotFound, make_registry
from trainer.runner import StageResult, run_stage, tail
from trainer.settings import Settings, get_settings

log = logging.getLogger("trainer.worker")

PROGRESS_WRITE_S = 0.5
SHUTDOWN_REASON = "the worker is shutting down"
# Set by the worker's SIGTERM/SIGINT handler; every running node then stops its stage.
shutting_down = threading.Event()
REPORT_FILES = (".md", ".png", ".svg", ".json", ".csv")


@dataclass
class Context:
    settings: Settings
    db: Database
    redis: Redis
    registry: Registry
    name: str


_context: Context | None = None


def context() -> Context:
    """This process's settings and connections, made on first use (RQ imports `run_node` by name)."""
    global _context
    if _context is None:
        settings = get_settings()
        _context = Context(settings, Database(settings.database_url), Redis.from_url(settings.redis_url),
                           make_registry(settings), f"{settings.host}.{os.getpid()}")
    return _context


def job_dir(settings: Settings, job_id: str) -> Path:
    return settings.runs_dir / "jobs" / job_id


def log_path(settings: Settings, job_id: str, node_rank: int) -> Path:
    return job_dir(settings, job_id) / f"log-node{node_rank}.txt"


def events_path(settings: Settings, job_id: str) -> Path:
    return job_dir(settings, job_id) / "events.jsonl"


class StepFailed(Exception):
    """A step ended the node's run: `status` is failed, cancelled or interrupted (worker shutdown)."""

    def __init__(self, status: str, message: str | None, log_tail: str | None = None):
        super().__init__(message or status)
        self.status, self.message, self.log_tail = status, message, log_tail


def run_node(job_id: str, node_rank: int) -> str:
    """RQ task: run node `node_rank` of job `job_id`; returns the node's final status."""
    return NodeRun(context(), job_id, node_rank).run()


class NodeRun:
    def __init__(self, ctx: Context, job_id: str, node_rank: int):
        self.ctx, self.s = ctx, ctx.settings
        self.job_id, self.rank = job_id, node_rank
        self.dir = job_dir(self.s, job_id)
        self.log_path = log_path(self.s, job_id, node_rank)
        self.events_lock = threading.Lock()
        self.last_progress_write = 0.0
        self.last_db_check = 0.0
        self.db_stop: str | None = None
        self._last_step: int | None = None

    def _claim(self) -> dict[str, Any] | None:
        now = time.time()
        with self.ctx.db.session() as s:
            # Write first (the node row, only if still queued): a concurrent cancel or a second
            # delivery of the same task then finds it taken.
            taken = s.execute(update(JobNode).where(JobNode.job_id == self.job_id, JobNode.node_rank == self.rank,
                                                    JobNode.status == "queued")
                              .values(status="running", host=self.s.host, worker=self.ctx.name, heartbeat_at=now,
                                      pgid=None, error=None)).rowcount
            if not taken:
                log.warning("job %s node %d is not queued; task dropped", self.job_id, self.rank)
                return None
            job = s.get(Job, self.job_id)
            if job.status in TERMINAL or job.cancel_requested:
                s.execute(update(JobNode).where(JobNode.job_id == self.job_id, JobNode.node_rank == self.rank)
                          .values(status="cancelled"))
                return None
            if job.status == "queued":
                job.status = "running"
                job.started_at = job.started_at or now
            return {"spec": job.spec, "attempt": job.attempts, "start": job.step_index, "nnodes": job.nnodes}

    def run(self) -> str:
        claim = self._claim()
        if claim is None:
            return "skipped"
        self.spec, self.attempt, self.nnodes = claim["spec"], claim["attempt"], claim["nnodes"]
        self.dir.mkdir(parents=True, exist_ok=True)
        beat = Heartbeat(self.ctx, self.job_id, self.rank)
        beat.start()
        status, error, log_tail = "succeeded", None, None
        try:
            for index in range(claim["start"], len(self.spec["steps"])):
                self._step(index, first=index == claim["start"])
        except StepFailed as e:
            status, error, log_tail = e.status, e.message, e.log_tail
        except Exception as e:
            # RQ's job timeout lands here too; the runner has already killed the stage's group.
            log.exception("job %s node %d: trainer error", self.job_id, self.rank)
            status, error, log_tail = "failed", f"trainer error: {type(e).__name__}: {e}", tail(self.log_path)
        except BaseException:
            # RQ's cold stop (SystemExit from a second signal): the runner has stopped the stage.
            requeue_interrupted(self.ctx, self.job_id, self.rank, self.attempt)
            raise
        finally:
            beat.stop()
        if status == "interrupted":
            requeue_interrupted(self.ctx, self.job_id, self.rank, self.attempt)
        else:
            finish_node(self.ctx.db, self.job_id, self.rank, self.ctx.name, self.attempt, status, error, log_tail)
        return status

    def stop_reason(self) -> str | None:
        """Why this node must stop now: a cancel request, the worker's shutdown, or the job ended /
        moved on elsewhere."""
        if cancel_requested(self.s, self.ctx.redis, self.job_id):
            return "cancelled"
        if shutting_down.is_set():
            return SHUTDOWN_REASON
        now = time.monotonic()
        if now - self.last_db_check >= 1.0:
            self.last_db_check = now
            with self.ctx.db.session() as s:
                job = s.get(Job, self.job_id)
                if job.cancel_requested:
                    self.db_stop = "cancelled"
                elif job.status in TERMINAL or job.attempts != self.attempt:
                    self.db_stop = f"job is {job.status} (attempt {job.attempts})"
        return self.db_stop

    def _fail_or_cancel(self, reason: str, log_tail: str | None = None) -> StepFailed:
        if reason == "cancelled":
            return StepFailed("cancelled", None, log_tail)
        if reason == SHUTDOWN_REASON:
            return StepFailed("interrupted", reason, log_tail)
        return StepFailed("failed", f"stopped: {reason}", log_tail)

    def _step(self, index: int, first: bool) -> None:
        step = self.spec["steps"][index]
        stage, n = step["stage"], len(self.spec["steps"])
        self._last_step = None
        if self.nnodes > 1:
            try:
                barrier(self.s, self.ctx.redis, self.job_id, f"a{self.attempt}-s{index}", self.nnodes,
                        self.s.gang_timeout if first else self.s.job_timeout, self.stop_reason)
            except BarrierAborted as e:
                raise self._fail_or_cancel(str(e)) from None
        reason = self.stop_reason()
        if reason:
            raise self._fail_or_cancel(reason)
        if self.rank == 0:
            with self.ctx.db.session() as s:
                s.execute(update(Job).where(Job.id == self.job_id).values(
                    step_index=index, current_stage=stage, step=None, total=None, eta_s=None))
        input_ref = self._input_for(index)
        out = self.dir / "steps" / f"{index:02d}-{stage}"
        config = self.dir / f"step{index:02d}-{stage}.json"
        config.write_text(json.dumps(step["options"]))
        extra_inputs, extra_versions = (self._report_inputs(index, input_ref) if stage == "report" and input_ref
                                        else ([], []))
        command = self._command(stage, config, out, input_ref, extra_inputs, extra_versions)
        env = {**os.environ, JOB_MARKER: node_tag(self.job_id, self.rank), "PYTHONUNBUFFERED": "1"}
        if self.rank == 0 and out.exists():
            # An earlier attempt's output that was never registered (a job moves on to the next
            # step only once it is): the stage writes it again, from its resumable state if any.
            shutil.rmtree(out)
        result = self._executor()(command, env, self.log_path, lambda e: self._on_event(index, e), self.stop_reason,
                           self._on_started, self.s.cancel_grace, node_tag(self.job_id, self.rank))
        # A stage that finished just before a shutdown reached it is kept: registered, not rerun.
        done_anyway = result.stopped == SHUTDOWN_REASON and result.returncode == 0 and result.finished is not None
        if result.stopped and not done_anyway:
            raise self._fail_or_cancel(result.stopped, result.log_tail)
        if result.returncode != 0:
            cause = result.last_error or f"exit code {result.returncode}"
            raise StepFailed("failed", f"stage {stage} (step {index + 1}/{n}) failed: {cause}", result.log_tail)
        self._register(index, stage, result, input_ref, out)

    def _executor(self) -> Callable[..., StageResult]:
        """How the stage runs: a local torchrun, or a container per node (TRAINER_EXECUTOR=docker)."""
        if self.s.executor == "docker":
            from trainer.docker_executor import DockerExecutor  # the optional `docker` extra

            return functools.partial(DockerExecutor(self.s).run_stage, job_id=self.job_id, node_rank=self.rank,
                                     gpus=self.spec["resources"]["nproc_per_node"])
        return run_stage

    def _command(self, stage: str, config: Path, out: Path, input_ref: dict[str, Any] | None,
                 extra_inputs: list[str], extra_versions: list[str]) -> list[str]:
        resources = self.spec["resources"]
        cmd = [*self.s.torchrun, f"--nproc-per-node={resources['nproc_per_node']}"]
        if self.nnodes > 1:
            cmd += [f"--nnodes={self.nnodes}", f"--node-rank={self.rank}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={self.s.rdzv_endpoint}", f"--rdzv-id={self.job_id}",
                    f"--rdzv-conf=is_host={'true' if self.rank == 0 else 'false'}"]
        else:
            cmd += ["--standalone"]
        module = self.s.stage_modules.get(stage, f"nanochat.stages.{stage}")
        cmd += ["-m", module, "--config", str(config), "--data-dir", str(self.s.data_dir), "--out", str(out),
                "--job-id", self.job_id]
        if input_ref is not None:
            cmd += ["--init-from", input_ref["path"], *extra_inputs]
            # DESIGN.md: an --input-version for each input the stage reads.
            for version in [f"{input_ref['name']}:{input_ref['version']}", *extra_versions]:
                cmd += ["--input-version", version]
        if resumable(stage) and resume_dir(out).is_dir():
            # An earlier attempt on this host was cut off after a resumable save.
            cmd += ["--resume"]
        return cmd

    def _report_inputs(self, index: int, input_ref: dict[str, Any]) -> tuple[list[str], list[str]]:
        """What `report` reads besides the input version: every ancestor's folder, each version's
        registry metrics (the eval stages patched them there) as an eval result, and this job's
        stage events (for stage times); and the ancestors' NAME:VERSION."""
        name, version = input_ref["name"], input_ref["version"]
        folder = self.dir / "steps" / f"{index:02d}-report-inputs"
        folder.mkdir(parents=True, exist_ok=True)
        try:
            chain = self._with_retries(f"lineage of {name}:{version}", lambda: self.ctx.registry.lineage(name, version))
            paths, versions = [], []
            for i, v in enumerate(chain):
                if i == 0:
                    path = input_ref["path"]
                else:
                    path = str(self._with_retries(f"download {v.name}:{v.version}", lambda v=v:
                                                  self.ctx.registry.download(v.name, v.version)))
                    paths.append(path)
                    versions.append(f"{v.name}:{v.version}")
                result = folder / f"metrics-{v.name}-v{v.version}"
                result.mkdir(exist_ok=True)
                (result / EVAL_FILE).write_text(json.dumps({
                    "made_by": "registry", "measured": [str(Path(path).resolve())],
                    "input_version": [f"{v.name}:{v.version}"], "job_id": v.job_id, "metrics": v.metrics}))
                paths.append(str(result))
        except (RegistryUnavailable, RegistryRejected, VersionNotFound) as e:
            raise StepFailed("failed", f"lineage of {name}:{version}: {e}") from None
        events = folder / "events.jsonl"
        source = events_path(self.s, self.job_id)
        lines = source.read_text().splitlines() if source.exists() else []
        # The job log tags each event with its step; the stage event schema has no such field.
        events.write_text("".join(json.dumps({k: v for k, v in json.loads(line).items() if k != "step_index"}) + "\n"
                                  for line in lines if line.strip()))
        return [*paths, str(events)], versions

    def _input_for(self, index: int) -> dict[str, Any] | None:
        """The version a step reads: the newest one this job made, else the job's own input."""
        step = self.spec["steps"][index]
        if not step.get("needs_input"):
            return None
        with self.ctx.db.session() as s:
            produced = s.get(Job, self.job_id).produced
        ref = produced[-1] if produced else self.spec.get("input")
        if ref is None:
            raise StepFailed("failed", f"stage {step['stage']} needs an input model and none was given or made")
        try:
            path = self._with_retries(f"download {ref['name']}:{ref['version']}",
                                      lambda: self.ctx.registry.download(ref["name"], ref["version"]))
        except (RegistryUnavailable, RegistryRejected, VersionNotFound) as e:
            raise StepFailed("failed", f"input {ref['name']}:{ref['version']}: {e}") from None
        return {**ref, "path": str(path)}

    def _on_started(self, pgid: int) -> None:
        with self.ctx.db.session() as s:
            s.execute(update(JobNode).where(JobNode.job_id == self.job_id, JobNode.node_rank == self.rank)
                      .values(pgid=pgid, host=self.s.host, heartbeat_at=time.time()))

    def _on_event(self, index: int, event: dict[str, Any]) -> None:
        with self.events_lock, open(events_path(self.s, self.job_id), "a") as f:
            f.write(json.dumps({**event, "step_index": index}) + "\n")
        kind = event["type"]
        values: dict[str, Any] = {}
        if kind == "progress":
            self._last_step = event["step"]
            now = time.monotonic()
            if now - self.last_progress_write < PROGRESS_WRITE_S and event["step"] != event.get("total"):
                return
            self.last_progress_write = now
            values = {"step": event["step"], "total": event.get("total"), "eta_s": event.get("eta_s")}
            metrics = {k: event[k] for k in ("loss", "lr", "tok_per_s", "mfu") if event.get(k) is not None}
        elif kind == "eval":
            metrics = {event["name"]: event["value"]}
        elif kind == "finished":
            metrics = dict(event.get("metrics") or {})
        else:
            return
        with self.ctx.db.session() as s:
            job = s.get(Job, self.job_id)
            for k, v in values.items():
                setattr(job, k, v)
            job.metrics = {**(job.metrics or {}), **metrics}

    def _with_retries(self, what: str, call: Any) -> Any:
        attempts = self.s.upload_retries + 1
        for attempt in range(1, attempts + 1):
            try:
                return call()
            except RegistryUnavailable as e:
                if attempt == attempts:
                    raise RegistryUnavailable(f"{what}: the registry failed {attempts} times; last error: {e}") from None
                delay = self.s.upload_backoff * 2 ** (attempt - 1)
                self._note(f"{what} failed (attempt {attempt}/{attempts}): {e}; retrying in {delay:g} s")
                time.sleep(delay)

    def _note(self, message: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(f"[trainer] {message}\n")

    def _register(self, index: int, stage: str, result: StageResult, input_ref: dict[str, Any] | None,
                  out: Path) -> None:
        finished = result.finished
        if finished is None:
            # Ranks other than 0 print no events: on those nodes there is nothing to register.
            return
        parent = f"{input_ref['name']}:{input_ref['version']}" if input_ref else None
        parent_ref = (input_ref["name"], input_ref["version"]) if input_ref else None
        try:
            for output in finished.get("outputs") or []:
                path = Path(output["path"])
                name = self.spec["output_name"]
                version = self._with_retries(
                    f"upload of {path} as {name} ({output['registry_stage']})",
                    lambda: self.ctx.registry.upload(
                        path, name, output["registry_stage"], parent=parent_ref, job_id=self.job_id,
                        metrics=finished.get("metrics") or {}, step=self._last_step))
                self._note(f"registered {name}:{version} ({output['registry_stage']}) from {path}")
                with self.ctx.db.session() as s:
                    job = s.get(Job, self.job_id)
                    job.produced = [*job.produced, {"name": name, "version": version,
                                                    "stage": output["registry_stage"], "made_by": stage,
                                                    "step_index": index}]
            if input_ref is not None and not finished.get("outputs"):
                metrics = finished.get("metrics") or {}
                if metrics:
                    self._with_retries(f"metrics of {parent}", lambda: self.ctx.registry.patch_metrics(
                        input_ref["name"], input_ref["version"], metrics))
                if out.is_dir():
                    for file in sorted(out.iterdir()):
                        if file.is_file() and file.suffix in REPORT_FILES:
                            self._with_retries(f"attachment {file.name} of {parent}", lambda f=file:
                                               self.ctx.registry.attach(input_ref["name"], input_ref["version"], f))
        except (RegistryUnavailable, RegistryRejected, VersionNotFound) as e:
            raise StepFailed("failed", f"{e}. The stage's output stays on disk at {out} for a retry.",
                             tail(self.log_path)) from None


class Heartbeat:
    """A thread stamping the node's heartbeat every `heartbeat_interval` s while it runs."""

    def __init__(self, ctx: Context, job_id: str, node_rank: int):
        self.ctx, self.job_id, self.rank = ctx, job_id, node_rank
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while not self.stopped.wait(self.ctx.settings.heartbeat_interval):
            try:
                with self.ctx.db.session() as s:
                    s.execute(update(JobNode).where(JobNode.job_id == self.job_id, JobNode.node_rank == self.rank,
                                                    JobNode.status == "running").values(heartbeat_at=time.time()))
            except Exception:
                log.exception("heartbeat of job %s failed", self.job_id)


def finish_node(db: Database, job_id: str, node_rank: int, worker: str, attempt: int, status: str,
                error: str | None, log_tail: str | None) -> None:
    """Record a node's end; the job ends at its first failed node, or when every node has ended."""
    now = time.time()
    with db.session() as s:
        # Write first: on SQLite that takes the write lock before we read the other nodes. Only
        # this worker's claim is closed: after a re-queue the row may belong to another worker.
        s.execute(update(JobNode).where(JobNode.job_id == job_id, JobNode.node_rank == node_rank,
                                        JobNode.status == "running", JobNode.worker == worker)
                  .values(status=status, error=error))
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
        s.execute(update(JobNode).where(JobNode.job_id == job_id, JobNode.node_rank == node_rank,
                                        JobNode.status == "running", JobNode.worker == ctx.name)
                  .values(status="queued", pgid=None, heartbeat_at=None))
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.status in TERMINAL or job.attempts != attempt:
            return
        if job.cancel_requested:
            job.status, job.finished_at = "cancelled", time.time()
            return
        job.attempts += 1
        job.status = "queued"
        job.error = (f"queued again (attempt {job.attempts + 1}): worker {ctx.name} shut down during step "
                     f"{job.step_index + 1} ({job.current_stage})")
        for node in job.nodes:
            node.status, node.pgid, node.heartbeat_at = "queued", None, None
        new_attempt, nnodes = job.attempts, job.nnodes
    try:
        enqueue_job(ctx.settings, ctx.redis, job_id, nnodes, new_attempt)
    except Exception:
        # The reaper queues a queued node's missing task again once Redis answers.
        log.exception("job %s: could not queue it again", job_id)
    log.warning("job queued again: worker %s shut down", ctx.name, extra={"job_id": job_id})


class Worker(SimpleWorker):
    """RQ's SimpleWorker, except that a stop request also stops the running stage (see the module
    docstring) instead of waiting for it to end."""

    def request_stop(self, signum: int, frame: Any) -> None:
        shutting_down.set()
        super().request_stop(signum, frame)


def _touch_loop(path: Path, interval: float) -> None:
    while True:
        path.touch()
        time.sleep(interval)


def worker_health() -> int:
    """Exit status for a container healthcheck: 0 while the worker's liveness file is fresh."""
    settings = get_settings()
    if settings.heartbeat_file is None:
        print("TRAINER_HEARTBEAT_FILE is not set", file=sys.stderr)
        return 1
    try:
        age = time.time() - settings.heartbeat_file.stat().st_mtime
    except OSError as e:
        print(f"no liveness file: {e}", file=sys.stderr)
        return 1
    if age > settings.heartbeat_limit:
        print(f"liveness file is {age:.0f} s old (limit {settings.heartbeat_limit:g} s)", file=sys.stderr)
        return 1
    return 0


def main(burst: bool = False) -> None:
    """Run a worker: migrations, the reaper thread, then RQ's SimpleWorker loop."""
    settings = get_settings()
    migrate(settings.database_url)
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    ctx = context()
    Reaper(settings, ctx.db, ctx.redis).start()
    if settings.heartbeat_file is not None:
        threading.Thread(target=_touch_loop, args=(settings.heartbeat_file, settings.heartbeat_interval),
                         name="liveness", daemon=True).start()
    worker = Worker([make_queue(settings, ctx.redis)], connection=ctx.redis, name=ctx.name,
                          serializer=JSONSerializer)
    log.info("worker %s on queue %s (host %s)", ctx.name, settings.queue_name, settings.host)
    worker.work(burst=burst, with_scheduler=False)
