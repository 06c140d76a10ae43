"""trainer.torchrun: the command line a node gets, checked against argv worked out by hand."""

from __future__ import annotations

from pathlib import Path

from trainer.torchrun import StepInputs, torchrun_argv

TORCHRUN = ["/venv/bin/python", "-m", "torch.distributed.run"]


def test_one_node_standalone_without_input() -> None:
    argv = torchrun_argv(
        torchrun=TORCHRUN,
        nproc_per_node=2,
        nnodes=1,
        node_rank=0,
        rdzv_endpoint="10.0.0.1:29400",
        job_id="j1",
        module="nanochat.stages.base_train",
        config=Path("/runs/jobs/j1/step02-base_train.json"),
        data_dir=Path("/data"),
        out=Path("/runs/jobs/j1/steps/02-base_train"),
        inputs=None,
        resume=False,
    )
    assert argv == [
        "/venv/bin/python",
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--standalone",
        "-m",
        "nanochat.stages.base_train",
        "--config",
        "/runs/jobs/j1/step02-base_train.json",
        "--data-dir",
        "/data",
        "--out",
        "/runs/jobs/j1/steps/02-base_train",
        "--job-id",
        "j1",
    ]


def test_one_node_with_input_and_resume() -> None:
    argv = torchrun_argv(
        torchrun=["torchrun"],
        nproc_per_node=1,
        nnodes=1,
        node_rank=0,
        rdzv_endpoint="unused:1",
        job_id="j2",
        module="nanochat.stages.sft",
        config=Path("c.json"),
        data_dir=Path("d"),
        out=Path("o"),
        inputs=StepInputs("/cache/m/3", "m:3"),
        resume=True,
    )
    assert argv == [
        "torchrun",
        "--nproc-per-node=1",
        "--standalone",
        "-m",
        "nanochat.stages.sft",
        "--config",
        "c.json",
        "--data-dir",
        "d",
        "--out",
        "o",
        "--job-id",
        "j2",
        "--init-from",
        "/cache/m/3",
        "--input-version",
        "m:3",
        "--resume",
    ]


def test_two_nodes_rendezvous_hosted_by_node_zero() -> None:
    common = dict(
        torchrun=["torchrun"],
        nproc_per_node=8,
        nnodes=2,
        rdzv_endpoint="10.0.0.1:29400",
        job_id="j3",
        module="nanochat.stages.mid_train",
        config=Path("c.json"),
        data_dir=Path("d"),
        out=Path("o"),
        inputs=None,
        resume=False,
    )
    tail = ["-m", "nanochat.stages.mid_train", "--config", "c.json", "--data-dir", "d", "--out", "o", "--job-id", "j3"]
    assert torchrun_argv(node_rank=0, **common) == [
        "torchrun",
        "--nproc-per-node=8",
        "--nnodes=2",
        "--node-rank=0",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:29400",
        "--rdzv-id=j3",
        "--rdzv-conf=is_host=true",
        *tail,
    ]
    assert torchrun_argv(node_rank=1, **common) == [
        "torchrun",
        "--nproc-per-node=8",
        "--nnodes=2",
        "--node-rank=1",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:29400",
        "--rdzv-id=j3",
        "--rdzv-conf=is_host=false",
        *tail,
    ]


def test_report_inputs_follow_the_input_version() -> None:
    inputs = StepInputs(
        "/cache/m/5", "m:5", extra_paths=["/cache/m/4", "/r/metrics-m-v5", "/r/events.jsonl"], extra_versions=["m:4"]
    )
    argv = torchrun_argv(
        torchrun=["torchrun"],
        nproc_per_node=1,
        nnodes=1,
        node_rank=0,
        rdzv_endpoint="x:1",
        job_id="j4",
        module="nanochat.stages.report",
        config=Path("c.json"),
        data_dir=Path("d"),
        out=Path("o"),
        inputs=inputs,
        resume=False,
    )
    assert argv[argv.index("--init-from") :] == [
        "--init-from",
        "/cache/m/5",
        "/cache/m/4",
        "/r/metrics-m-v5",
        "/r/events.jsonl",
        "--input-version",
        "m:5",
        "--input-version",
        "m:4",
    ]
