"""The Ray executor: a job with nnodes > 1 runs as one placement group on a Ray cluster
(`TRAINER_EXECUTOR=ray`, `TRAINER_RAY_ADDRESS` or `RAY_ADDRESS`; extra `nanochat-trainer[ray]`).

The job still comes through RQ, on the multi-node queue that only workers with this executor
drain (`trainer.dispatch`): node 0's task is taken by a worker, which becomes the Ray driver of
the whole job (`RayJobRun`); the other nodes' tasks are dropped, since their share runs inside
node 0's placement group. Per step the driver:

  1. asks Ray for one placement group: a bundle per node, STRICT_SPREAD (no two on one Ray node),
     `nproc_per_node` GPUs each (CPUs with `ray_gpus` off); the gang is placed whole or not at all,
     and a cluster without room for it within `gang_timeout` fails the job unstarted;
  2. puts a `trainer.ray_actor.StageActor` in each bundle; rank 0's actor picks a free port on its
     node, and every node's torchrun (the same command line as the local executor's, from
     `trainer.torchrun`, with its node rank and that rendezvous endpoint) is started by its actor;
  3. collects every node's output into `log-node<r>.txt` and rank 0's stage events into the job
     (`trainer.runner.watch`, the callbacks of `trainer.progress`), exactly as a local run does;
     rank 0's finished event is registered by `trainer.registration` on the driver as usual;
  4. on cancel, a worker shutdown, a node that exits with an error or a lost node (Ray reports its
     actor dead), stops every node's torchrun (SIGTERM, `cancel_grace`, SIGKILL), kills the actors
     and removes the placement group. A lost node fails the step; the job's retry policy then
     decides whether a new attempt resumes it from its last resumable checkpoint.

Why actors running torchrun rather than Ray Train's TorchTrainer: the stages are torchrun programs
(`python -m nanochat.stages.<stage>`) that set up their own process group, write their own
checkpoints and print the stage events the trainer reads; TorchTrainer would run them as a Python
function in Ray's workers, with its own rendezvous, checkpoint store and reporting, so every stage
would need a second entry point and the local, docker and Ray executors would run different code.
With actors the stage's command line is byte for byte the local one, and Ray only does what it is
needed for: gang placement, the processes on each node, and telling us when a node is gone.

The job's folders (runs_dir, data_dir) must be at the same paths on every Ray node (a shared
volume): the stage reads its inputs there and rank 0 writes its checkpoints there, which the
driver then uploads. Ray starts its workers at niceness 15, and torchrun inherits it: a cluster for
training sets the system config worker_niceness=0 (RAY_worker_niceness=0 on the head); the log of
a node whose stage runs niced says so.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The Ray nodes run the trainer's image: no code is shipped to them. Read when ray is imported:
# Ray's uv hook would otherwise upload the worker's folder and start every actor through `uv run`
# whenever the worker itself runs under it (make up, the tests).
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

import ray  # noqa: E402
from nanochat_contracts.events import parse_event_line  # noqa: E402
from nanochat_contracts.job_folder import log_path  # noqa: E402
from ray.exceptions import RayActorError, RayError  # noqa: E402
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402
from sqlalchemy import update  # noqa: E402

from trainer.db import Job, JobNode  # noqa: E402
from trainer.node_context import Context, StepFailed  # noqa: E402
from trainer.node_state import finish_node, heartbeat  # noqa: E402
from trainer.procs import JOB_MARKER, node_tag  # noqa: E402
from trainer.ray_actor import STDOUT, StageActor  # noqa: E402
from trainer.runner import POLL_S, StageResult, _Log, _record, tail, watch  # noqa: E402
from trainer.settings import Settings  # noqa: E402
from trainer.worker import NodeRun  # noqa: E402

NAMESPACE = "nanochat-trainer"
# Worker variables a stage on a Ray node gets besides the job's own (by name prefix).
ENV_PREFIXES = ("NANOCHAT_", "HF_", "NCCL_", "TORCH_", "OMP_", "GLOO_", "CUDA_")
LOST = "lost"
# An actor's process starting (a fresh Python on its node) and answering its first calls.
START_TIMEOUT_S = 120


def run_gang(ctx: Context, job_id: str, node_rank: int) -> str:
    """The RQ task of a worker with the ray executor: node 0 of a multi-node job drives the whole
    job on Ray, its other nodes' tasks are dropped; a one-node job runs locally as always."""
    with ctx.db.session() as s:
        job = s.get(Job, job_id)
        nnodes = job.nnodes if job is not None else 1
    if nnodes == 1:
        return NodeRun(ctx, job_id, node_rank).run()
    if node_rank > 0:
        return "skipped"
    return RayJobRun(ctx, job_id, 0).run()


def node_argv(argv: list[str], node_rank: int, rdzv_endpoint: str) -> list[str]:
    """Node 0's torchrun arguments (from `trainer.torchrun.torchrun_argv`) for node `node_rank`,
    with the rendezvous at `rdzv_endpoint` (node 0 hosts it)."""
    out = []
    for arg in argv:
        if arg.startswith("--node-rank="):
            arg = f"--node-rank={node_rank}"
        elif arg.startswith("--rdzv-endpoint="):
            arg = f"--rdzv-endpoint={rdzv_endpoint}"
        elif arg.startswith("--rdzv-conf=is_host="):
            arg = f"--rdzv-conf=is_host={'true' if node_rank == 0 else 'false'}"
        out.append(arg)
    return out


def connect(settings: Settings) -> None:
    """Join the Ray cluster as a driver (once per worker process)."""
    if ray.is_initialized():
        return
    address = settings.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        # Without an address ray.init would start a private cluster inside the worker.
        raise ConnectionError("the ray executor needs TRAINER_RAY_ADDRESS (or RAY_ADDRESS): the Ray cluster's head")
    ray.init(address=address, namespace=NAMESPACE, log_to_driver=False, logging_level="WARNING")


@dataclass
class _Gang:
    """What the collector thread learns about the nodes, read by the watch loop."""

    codes: dict[int, int] = field(default_factory=dict)
    broken: str | None = None
    done: threading.Event = field(default_factory=threading.Event)


class RayGang:
    """Runs one stage of a job on a placement group; plugs in where `trainer.runner.run_stage` does."""

    def __init__(self, settings: Settings):
        self.s = settings

    def bundle(self, nproc: int) -> dict[str, float]:
        return {"GPU": float(nproc)} if self.s.ray_gpus else {"CPU": float(nproc)}

    def run_stage(
        self,
        command: list[str],
        env: dict[str, str],
        log_path0: Path,
        on_event: Callable[[dict[str, Any]], None],
        should_stop: Callable[[], str | None],
        on_started: Callable[[int], None],
        grace: float,
        tag: str,
        *,
        job_id: str,
        nnodes: int,
        nproc_per_node: int,
        on_node_started: Callable[[int, str, int], None],
    ) -> StageResult:
        logs = [_Log(log_path0 if r == 0 else log_path(self.s.runs_dir, job_id, r)) for r in range(nnodes)]
        result = StageResult(returncode=-1)
        pg: PlacementGroup | None = None
        actors: list[Any] = []
        gang = _Gang()
        collector: threading.Thread | None = None
        events: queue.Queue = queue.Queue()
        try:
            connect(self.s)
            pg = placement_group([self.bundle(nproc_per_node)] * nnodes, strategy="STRICT_SPREAD")
            asked = time.monotonic()
            if self._placed(pg, nnodes, nproc_per_node, should_stop, result, logs[0]):
                placed = time.monotonic()
                self._launch(pg, actors, command, env, job_id, nproc_per_node, logs, on_started, on_node_started)
                logs[0].write(
                    f"[trainer] ray: {nnodes} nodes placed in {placed - asked:.1f} s, their torchruns started "
                    f"{time.monotonic() - placed:.1f} s later".encode()
                )
                collector = threading.Thread(target=self._collect, args=(actors, logs, events, gang), daemon=True)
                collector.start()
                watch(
                    result,
                    events,
                    on_event,
                    gang.done.is_set,
                    lambda: should_stop() or gang.broken,
                    lambda: self._stop(actors, grace),
                    logs[0],
                )
        except (RayError, ConnectionError, TimeoutError) as e:
            result.last_error = f"Ray: {type(e).__name__}: {e}"
            logs[0].write(f"[trainer] {result.last_error}".encode())
        finally:
            # Whatever happened, no process, actor or placement group of the job is left.
            self._stop(actors, grace)
            if collector is not None:
                collector.join(timeout=grace + 30)
            for actor in actors:
                ray.kill(actor, no_restart=True)
            if pg is not None:
                remove_placement_group(pg)
            while not events.empty():
                _record(result, events.get_nowait(), on_event)
            result.returncode = self._returncode(gang, nnodes, result)
            for log in logs:
                log.write(f"[trainer] stage exited with code {result.returncode}".encode())
                log.close()
        result.log_tail = tail(log_path0)
        return result

    def _launch(
        self,
        pg: PlacementGroup,
        actors: list[Any],
        command: list[str],
        env: dict[str, str],
        job_id: str,
        nproc: int,
        logs: list[_Log],
        on_started: Callable[[int], None],
        on_node_started: Callable[[int, str, int], None],
    ) -> None:
        """An actor in each bundle (appended to `actors` as made, so a failure leaves none
        behind), then each node's torchrun, rendezvous at rank 0's node."""
        for r in range(len(logs)):
            actors.append(self._actor(pg, r, node_tag(job_id, r), nproc))
        endpoint = ray.get(actors[0].rendezvous_endpoint.remote(), timeout=START_TIMEOUT_S)
        args = self._args(command)
        for r, actor in enumerate(actors):
            argv = node_argv(args, r, endpoint)
            host = ray.get(actor.node_address.remote(), timeout=START_TIMEOUT_S)
            nice = ray.get(actor.niceness.remote(), timeout=START_TIMEOUT_S)
            if nice > 0:
                logs[r].write(
                    f"[trainer] the stage runs at niceness {nice} on {host}: any other work there comes first; "
                    "start the Ray cluster with RAY_worker_niceness=0 (a system config of the head)".encode()
                )
            logs[r].write(f"[trainer] $ (ray node {host}) torchrun {' '.join(argv)}".encode())
            pid = ray.get(actor.start.remote(argv, self._env(env, job_id, r)), timeout=START_TIMEOUT_S)
            if r == 0:
                on_started(pid)
            on_node_started(r, host, pid)

    def _placed(
        self,
        pg: PlacementGroup,
        nnodes: int,
        nproc: int,
        should_stop: Callable[[], str | None],
        result: StageResult,
        log: _Log,
    ) -> bool:
        """Wait for the gang to be placed; False (result filled in) on a stop or `gang_timeout`."""
        ready = pg.ready()
        deadline = time.monotonic() + self.s.gang_timeout
        while not ray.wait([ready], timeout=POLL_S)[0]:
            reason = should_stop()
            if reason:
                result.stopped = reason
                return False
            if time.monotonic() >= deadline:
                result.last_error = (
                    f"the Ray cluster did not place the job's {nnodes} nodes ({self.bundle(nproc)} each, one per "
                    f"Ray node) within {self.s.gang_timeout:g} s; free: {ray.available_resources()}"
                )
                log.write(f"[trainer] {result.last_error}".encode())
                return False
        return True

    def _actor(self, pg: PlacementGroup, rank: int, tag: str, nproc: int) -> Any:
        resources = {"num_gpus": nproc, "num_cpus": 0} if self.s.ray_gpus else {"num_cpus": nproc}
        return StageActor.options(
            max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=rank),
            **resources,
        ).remote(tag)

    def _args(self, command: list[str]) -> list[str]:
        """torchrun's arguments: the worker's torchrun head goes, each node runs its own."""
        head = self.s.torchrun
        if command[: len(head)] != head:
            raise ValueError(f"the stage command does not start with the configured torchrun {head}: {command}")
        return command[len(head) :]

    def _env(self, env: dict[str, str], job_id: str, rank: int) -> dict[str, str]:
        """The job's own variables and the passed-through ones; never the worker's whole
        environment (its PATH and venv are not the Ray node's)."""
        own = {k: v for k, v in env.items() if os.environ.get(k) != v or k.startswith(ENV_PREFIXES)}
        return {**own, JOB_MARKER: node_tag(job_id, rank)}

    def _collect(self, actors: list[Any], logs: list[_Log], events: Any, gang: _Gang) -> None:
        """Pull every node's output until each has exited or is lost; stage events on stdout go
        to `events`. The first node lost, or exiting with an error, breaks the gang."""
        pending = {r: actors[r].drain.remote() for r in range(len(actors))}
        while pending:
            ready, _ = ray.wait(list(pending.values()), num_returns=1, timeout=POLL_S)
            for ref in ready:
                rank = next(r for r, p in pending.items() if p == ref)
                try:
                    lines, code = ray.get(ref)
                except RayActorError as e:
                    del pending[rank]
                    gang.broken = gang.broken or f"{LOST}: node {rank} of the job was lost ({type(e).__name__})"
                    logs[rank].write(f"[trainer] node {rank} lost: {e}".encode())
                    continue
                for which, line in lines:
                    logs[rank].write(line)
                    # c10d hands out the global ranks in join order, so global rank 0 (the only
                    # one that prints events) may be on any node.
                    if which == STDOUT:
                        event = parse_event_line(line.decode("utf-8", "replace"))
                        if event is not None:
                            events.put(event.model_dump(mode="json"))
                if code is None:
                    pending[rank] = actors[rank].drain.remote()
                    continue
                del pending[rank]
                gang.codes[rank] = code
                if code != 0 and gang.broken is None:
                    gang.broken = f"node {rank} exited with code {code}"
            time.sleep(POLL_S if not ready else 0)
        gang.done.set()

    def _stop(self, actors: list[Any], grace: float) -> None:
        """Stop every node's torchrun at once (each actor waits out the grace period itself)."""
        refs = [actor.stop.remote(grace) for actor in actors]
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=grace + 10)

    def _returncode(self, gang: _Gang, nnodes: int, result: StageResult) -> int:
        if not gang.codes and gang.broken is None:
            return result.returncode
        if gang.broken and gang.broken.startswith(LOST):
            result.last_error = result.last_error or gang.broken
            return -1
        failed = [code for code in gang.codes.values() if code != 0]
        if failed:
            return failed[0]
        return 0 if len(gang.codes) == nnodes else -1


class RayJobRun(NodeRun):
    """Node 0's run when it drives the whole job on Ray: it also claims, heartbeats and ends the
    other nodes' rows, which no worker of their own holds."""

    def run(self) -> str:
        self.beats: list[Any] = []
        try:
            status = super().run()
        finally:
            for beat in self.beats:
                beat.stop()
        if status not in ("skipped", "interrupted"):
            # After node 0's end; the last node's end decides the job (see finish_node).
            for rank in range(1, self.nnodes):
                finish_node(self.ctx, self.job_id, rank, self.attempt, status, None, None)
        return status

    def _claim_followers(self) -> None:
        with self.ctx.db.session() as s:
            s.execute(
                update(JobNode)
                .where(JobNode.job_id == self.job_id, JobNode.node_rank > 0, JobNode.status == "queued")
                .values(status="running", worker=self.ctx.name, heartbeat_at=time.time(), pgid=None, error=None)
            )
        self.beats = [heartbeat(self.ctx, self.job_id, r) for r in range(1, self.nnodes)]
        for beat in self.beats:
            beat.start()

    def _begin_step(self, index: int, stage: str, first: bool) -> None:
        if first:
            self._claim_followers()
        super()._begin_step(index, stage, first)

    def _fail_or_cancel(self, reason: str, log_tail: str | None = None) -> StepFailed:
        if reason.startswith(LOST):
            # The platform's failure, not the stage's: the job's retry policy applies to it.
            return StepFailed("failed", f"stopped: {reason}", log_tail, infrastructure=True)
        return super()._fail_or_cancel(reason, log_tail)

    def _executor(self) -> Callable[..., StageResult]:
        return functools.partial(
            RayGang(self.s).run_stage,
            job_id=self.job_id,
            nnodes=self.nnodes,
            nproc_per_node=self.spec["resources"]["nproc_per_node"],
            on_node_started=self._on_node_started,
        )

    def _on_node_started(self, rank: int, host: str, pid: int) -> None:
        if rank == 0:
            return  # node 0's row is the driver's (record_started), so this host's reaper watches it
        with self.ctx.db.session() as s:
            s.execute(
                update(JobNode)
                .where(JobNode.job_id == self.job_id, JobNode.node_rank == rank)
                .values(host=f"ray:{host}", pgid=pid, heartbeat_at=time.time())
            )
