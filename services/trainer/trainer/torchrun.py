"""The torchrun command line of one step on one node, as a pure function of its inputs.

No file system, settings or database is read here (the caller decides `resume` and the module), so
the command a job gets can be worked out by hand and tested as such.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class StepInputs:
    """What a step reads: its input version's folder and NAME:VERSION, plus any further inputs
    (a report's ancestors, their metrics and the job's events) and their NAME:VERSIONs."""

    path: str
    version: str
    extra_paths: Sequence[str] = field(default_factory=tuple)
    extra_versions: Sequence[str] = field(default_factory=tuple)


def torchrun_argv(
    *,
    torchrun: Sequence[str],
    nproc_per_node: int,
    nnodes: int,
    node_rank: int,
    rdzv_endpoint: str,
    job_id: str,
    module: str,
    config: Path,
    data_dir: Path,
    out: Path,
    inputs: StepInputs | None,
    resume: bool,
) -> list[str]:
    """One node's command: a standalone torchrun for one node, a c10d rendezvous (hosted by node 0,
    keyed by the job id) for several."""
    argv = [*torchrun, f"--nproc-per-node={nproc_per_node}"]
    if nnodes > 1:
        argv += [
            f"--nnodes={nnodes}",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-id={job_id}",
            f"--rdzv-conf=is_host={'true' if node_rank == 0 else 'false'}",
        ]
    else:
        argv += ["--standalone"]
    argv += ["-m", module, "--config", str(config), "--data-dir", str(data_dir), "--out", str(out), "--job-id", job_id]
    if inputs is not None:
        argv += ["--init-from", inputs.path, *inputs.extra_paths]
        # DESIGN.md: an --input-version for each input the stage reads.
        for version in [inputs.version, *inputs.extra_versions]:
            argv += ["--input-version", version]
    if resume:
        argv += ["--resume"]
    return argv
