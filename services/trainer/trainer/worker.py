"""The worker: an RQ worker whose task runs one node's share of a job, step after step.

    python -m trainer worker            # TRAINER_* settings; runs until SIGTERM or SIGINT

It uses RQ's SimpleWorker (the task runs in the worker process itself, no fork), so the worker's
heartbeat and the job's heartbeat die together: if the worker is SIGKILLed, torchrun's group,
alone in its session, is found by a reaper (`trainer.reaper`, a thread in every worker and in the
API) once the heartbeat is older than `heartbeat_limit`, killed, and the job retried as a new
attempt on a live worker (its `max_attempts` allowing) or failed. A new attempt of this node on
this host first stops anything an earlier one left running. A Redis or database blip does not
stop a running stage: the stop check rides it out (`trainer.outage`).

The worker runs only its own task: a queued job naming any other function is refused before RQ
imports what it names (`TrainerTask`), since whoever can write to Redis can queue one.

Per step the node task (`run_node`) fetches the step's input version from the registry, runs
`torchrun -m nanochat.stages.<stage>` with the step's options as a JSON config, appends the
stage's events to `events.jsonl` and its output to `log-node<r>.txt` in the job folder, then
registers what the stage made: each output checkpoint is uploaded with lineage (retried with
backoff; the folder stays on disk when the registry is unreachable), an eval stage's metrics are
patched onto the version it measured, the report's files are attached to it. A job with
nnodes > 1 is run by a worker with the ray executor, as one placement group on a Ray cluster
(`trainer.ray_executor`); only such workers drain its queue.

A worker told to stop (SIGTERM or SIGINT: `docker compose stop`, Ctrl-C of `make up`) does not
wait for a stage that may run for hours: it stops the running stage (SIGTERM, `cancel_grace`,
SIGKILL) and puts the job back on the queue as a new attempt that starts again at the step that
was cut off; a training stage that saved a resumable checkpoint continues from it (`--resume`).
A second signal is RQ's cold stop; the stage is still stopped on the way out.

The parts live in their own modules: the job folder's layout in `nanochat_contracts.job_folder`, the node's database rows
(claim, heartbeat, end, re-queue) in `trainer.node_state`, the step's inputs in `trainer.inputs`,
the torchrun command in `trainer.torchrun`, the events in `trainer.progress` and the registration
in `trainer.registration`; `NodeRun` here only moves a node from step to step.
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
from pathlib import Path
from typing import Any

from nanochat.stages.options import resumable, resume_dir
from nanochat_contracts.job_folder import job_dir, report_inputs_dir, step_config, step_out
from redis import Redis
from rq import SimpleWorker
from rq.job import Job as RqJob
from rq.serializers import JSONSerializer
from sqlalchemy import update

from trainer.db import TERMINAL, Job, migrate
from trainer.dispatch import TASK, cancel_requested, make_queue
from trainer.inputs import input_for, report_inputs
from trainer.node_context import Context, Node, StepFailed, context
from trainer.node_state import (
    claim_node,
    finish_node,
    heartbeat,
    record_resume,
    record_started,
    requeue_interrupted,
)
from trainer.outage import Outage, StoreUnreachable, retry_store
from trainer.procs import JOB_MARKER, node_tag, terminate_job
from trainer.progress import StepEvents
from trainer.reaper import Reaper
from trainer.registration import register_step
from trainer.runner import StageResult, run_stage, tail
from trainer.settings import get_settings
from trainer.torchrun import StepInputs, torchrun_argv

log = logging.getLogger("trainer.worker")

SHUTDOWN_REASON = "the worker is shutting down"
# A multi-node job's rendezvous is on its rank-0 Ray actor's node, known only once the actors
# run: the Ray executor puts that address in each node's command (`ray_executor.node_argv`).
RDZV_BY_RAY = "rank-0-ray-actor:0"
STORE_REASON = "the job store is unreachable"
# Set by the worker's SIGTERM/SIGINT handler; every running node then stops its stage.
shutting_down = threading.Event()


def run_node(job_id: str, node_rank: int) -> str:
    """RQ task: run node `node_rank` of job `job_id`; returns the node's final status."""
    ctx = context()
    if ctx.settings.executor == "ray":
        from trainer.ray_executor import run_gang  # the optional `ray` extra

        return run_gang(ctx, job_id, node_rank)
    return NodeRun(ctx, job_id, node_rank).run()


class NodeRun:
    """One node's run: claimed -> each step from the job's current one -> finished, failed,
    cancelled, or (worker shutdown) queued again."""

    def __init__(self, ctx: Context, job_id: str, node_rank: int):
        self.ctx, self.s = ctx, ctx.settings
        self.node = Node(ctx, job_id, node_rank)
        self.job_id, self.rank = job_id, node_rank
        self.dir = job_dir(self.s.runs_dir, job_id)
        self.events = StepEvents(self.node)
        self.last_db_check = 0.0
        self.db_stop: str | None = None
        self.redis_outage = Outage("Redis", self.s.store_outage_limit)
        self.db_outage = Outage("the database", self.s.store_outage_limit)

    def run(self) -> str:
        claim = claim_node(self.ctx, self.job_id, self.rank)
        if claim is None:
            return "skipped"
        self.spec, self.attempt, self.nnodes = claim.spec, claim.attempt, claim.nnodes
        self.dir.mkdir(parents=True, exist_ok=True)
        self._end_leftovers()
        beat = heartbeat(self.ctx, self.job_id, self.rank)
        beat.start()
        try:
            status, error, log_tail, infrastructure = self._steps(claim.start)
            # The end must land even through a database blip (the heartbeat goes on meanwhile): a
            # node left `running` would be taken for lost and its finished step run again.
            if status == "interrupted":
                end = functools.partial(requeue_interrupted, self.ctx, self.job_id, self.rank, self.attempt)
            else:
                end = functools.partial(
                    finish_node, self.ctx, self.job_id, self.rank, self.attempt, status, error, log_tail, infrastructure
                )
            retry_store(f"recording the end of job {self.job_id} node {self.rank}", end, self.s.store_outage_limit)
        finally:
            beat.stop()
        return status

    def _steps(self, start: int) -> tuple[str, str | None, str | None, bool]:
        """Run the steps from `start`: (status, error, log tail, whether the failure was the platform's)."""
        try:
            for index in range(start, len(self.spec["steps"])):
                self._step(index, first=index == start)
        except StepFailed as e:
            return e.status, e.message, e.log_tail, e.infrastructure
        except Exception as e:
            # RQ's job timeout lands here too; the runner has already killed the stage's group.
            log.exception("job %s node %d: trainer error", self.job_id, self.rank)
            return "failed", f"trainer error: {type(e).__name__}: {e}", tail(self.node.log_path), True
        except BaseException:
            # RQ's cold stop (SystemExit from a second signal): the runner has stopped the stage.
            requeue_interrupted(self.ctx, self.job_id, self.rank, self.attempt)
            raise
        return "succeeded", None, None, False

    def _end_leftovers(self) -> None:
        """A process of an earlier attempt of this node still alive on this host (its worker died
        and no reaper got to it yet) would write the same output folder: it goes first."""
        if terminate_job(None, node_tag(self.job_id, self.rank), self.s.cancel_grace):
            self.node.note(f"stopped the processes an earlier attempt of this job left on {self.s.host}")

    def stop_reason(self) -> str | None:
        """Why this node must stop now: a cancel request, the worker's shutdown, the job ended /
        moved on elsewhere, or Redis or the database unreachable for longer than the outage limit
        (a shorter outage is ridden out: the checks then answer what they last knew)."""
        try:
            return self._stop_reason()
        except StoreUnreachable as e:
            return f"{STORE_REASON}: {e}"

    def _stop_reason(self) -> str | None:
        if self.redis_outage.check(lambda: cancel_requested(self.s, self.ctx.redis, self.job_id), False):
            return "cancelled"
        if shutting_down.is_set():
            return SHUTDOWN_REASON
        now = time.monotonic()
        if now - self.last_db_check >= 1.0:
            self.last_db_check = now
            self.db_stop = self.db_outage.check(self._db_stop, self.db_stop)
        return self.db_stop

    def _db_stop(self) -> str | None:
        with self.ctx.db.session() as s:
            job = s.get(Job, self.job_id)
            if job.cancel_requested:
                return "cancelled"
            if job.status in TERMINAL or job.attempts != self.attempt:
                return f"job is {job.status} (attempt {job.attempts + 1})"
        return None

    def _fail_or_cancel(self, reason: str, log_tail: str | None = None) -> StepFailed:
        if reason == "cancelled":
            return StepFailed("cancelled", None, log_tail)
        if reason == SHUTDOWN_REASON:
            return StepFailed("interrupted", reason, log_tail)
        return StepFailed("failed", f"stopped: {reason}", log_tail, infrastructure=reason.startswith(STORE_REASON))

    def _begin_step(self, index: int, stage: str, first: bool) -> None:
        """Stop if told to, and (node 0) mark the step as the job's current one."""
        reason = self.stop_reason()
        if reason:
            raise self._fail_or_cancel(reason)
        if self.rank == 0:
            retry_store("marking the current step", lambda: self._mark_step(index, stage), self.s.store_outage_limit)

    def _mark_step(self, index: int, stage: str) -> None:
        with self.ctx.db.session() as s:
            s.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(step_index=index, current_stage=stage, step=None, total=None, eta_s=None)
            )

    def _step(self, index: int, first: bool) -> None:
        step = self.spec["steps"][index]
        stage, n = step["stage"], len(self.spec["steps"])
        self.events.last_step = None
        self._begin_step(index, stage, first)
        input_ref = input_for(self.node, step, self.spec)
        out = step_out(self.dir, index, stage)
        config = step_config(self.dir, index, stage)
        config.write_text(json.dumps(step["options"]))
        # An earlier attempt of this step (on this host, or through the shared runs folder) was
        # cut off after a resumable save: the stage continues from it instead of step 0.
        resume = resumable(stage) and resume_dir(out).is_dir()
        command = self._command(index, stage, config, out, input_ref, resume)
        if resume and self.rank == 0:
            record_resume(self.ctx, self.job_id, self.attempt, saved_step(resume_dir(out)))
        env = {**os.environ, JOB_MARKER: node_tag(self.job_id, self.rank), "PYTHONUNBUFFERED": "1"}
        if self.rank == 0 and out.exists():
            # An earlier attempt's output that was never registered (a job moves on to the next
            # step only once it is): the stage writes it again, from its resumable state if any.
            shutil.rmtree(out)
        result = self._executor()(
            command,
            env,
            self.node.log_path,
            lambda e: self.events.on_event(index, e),
            self.stop_reason,
            self._on_started,
            self.s.cancel_grace,
            node_tag(self.job_id, self.rank),
        )
        # A stage that finished just before a shutdown reached it is kept: registered, not rerun.
        done_anyway = result.stopped == SHUTDOWN_REASON and result.returncode == 0 and result.finished is not None
        if result.stopped and not done_anyway:
            raise self._fail_or_cancel(result.stopped, result.log_tail)
        if result.returncode != 0:
            cause = result.last_error or f"exit code {result.returncode}"
            raise StepFailed("failed", f"stage {stage} (step {index + 1}/{n}) failed: {cause}", result.log_tail)
        if result.finished is not None:
            # Ranks other than 0 print no events: on those nodes there is nothing to register.
            register_step(self.node, self.spec, index, stage, result.finished, input_ref, out, self.events.last_step)

    def _command(
        self, index: int, stage: str, config: Path, out: Path, input_ref: dict[str, Any] | None, resume: bool
    ) -> list[str]:
        inputs = None
        if input_ref is not None:
            extra_paths, extra_versions = (
                report_inputs(self.node, report_inputs_dir(self.dir, index), input_ref)
                if stage == "report"
                else ([], [])
            )
            inputs = StepInputs(
                input_ref["path"], f"{input_ref['name']}:{input_ref['version']}", extra_paths, extra_versions
            )
        return torchrun_argv(
            torchrun=self.s.torchrun,
            nproc_per_node=self.spec["resources"]["nproc_per_node"],
            nnodes=self.nnodes,
            node_rank=self.rank,
            rdzv_endpoint=RDZV_BY_RAY,
            job_id=self.job_id,
            module=self.s.stage_modules.get(stage, f"nanochat.stages.{stage}"),
            config=config,
            data_dir=self.s.data_dir,
            out=out,
            inputs=inputs,
            resume=resume,
        )

    def _executor(self) -> Callable[..., StageResult]:
        """How the stage runs: a local torchrun, or a container per node (TRAINER_EXECUTOR=docker)."""
        if self.s.executor == "docker":
            from trainer.docker_executor import DockerExecutor  # the optional `docker` extra

            return functools.partial(
                DockerExecutor(self.s).run_stage,
                job_id=self.job_id,
                node_rank=self.rank,
                gpus=self.spec["resources"]["nproc_per_node"],
            )
        return run_stage

    def _on_started(self, pgid: int) -> None:
        record_started(self.ctx, self.job_id, self.rank, pgid)


def saved_step(checkpoint: Path) -> int | None:
    """The training step a resumable checkpoint was saved at (its meta.json's)."""
    try:
        return json.loads((checkpoint / "meta.json").read_text()).get("step")
    except (OSError, ValueError):
        return None


class TaskRefused(RuntimeError):
    """A task on the queue names a function other than the trainer's own."""


class TrainerTask(RqJob):
    """An RQ job that runs only `trainer.worker.run_node`: whoever can write to Redis could
    otherwise queue any importable function (`os.system`) for the worker to call. The name is
    checked before RQ imports anything it names."""

    def perform(self) -> Any:
        if self.func_name != TASK:
            log.error("refused task %s: it names %r, not %s", self.id, self.func_name, TASK)
            raise TaskRefused(f"this worker runs only {TASK}, not {self.func_name!r}")
        return super().perform()


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
        threading.Thread(
            target=_touch_loop,
            args=(settings.heartbeat_file, settings.heartbeat_interval),
            name="liveness",
            daemon=True,
        ).start()
    # RQ blocks on its queue for minutes at a time: its connection has no socket timeout.
    rq_redis = Redis.from_url(settings.redis_url)
    queues = [make_queue(settings, rq_redis)]
    if settings.executor == "ray":
        queues.append(make_queue(settings, rq_redis, multi_node=True))
    worker = Worker(
        queues,
        connection=rq_redis,
        name=ctx.name,
        serializer=JSONSerializer,
        job_class=TrainerTask,
    )
    log.info("worker %s on queues %s (host %s)", ctx.name, ", ".join(q.name for q in queues), settings.host)
    worker.work(burst=burst, with_scheduler=False)
