"""Multi-node start-up on this machine: POST /v1/jobs -> the stage's first `progress` event of a
2-node x 1-process job through the Ray executor (one worker as the driver of a local Ray cluster:
a head without CPUs and two worker nodes of one CPU, `ray.cluster_utils.Cluster`), against the
same job on 1 node x 2 processes through the local executor (one `python -m trainer worker`,
TRAINER_EXECUTOR=local: only Ray runs jobs on more than one node); and the resident memory of the
Ray head's processes, idle and after the jobs.

    uv run python bench/multi_node.py [--repeats 3] [--skip-local]

The job is make_data with tiny options (rank 0 does the work, no registry needed). Prints a table
and writes bench/results/multi_node.json. --skip-local measures the Ray path only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This file is bench/multi_node.py: its folder, first on sys.path, would shadow the trainer package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
# Every Ray node on the loopback (Ray would pick this machine's outside address otherwise).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

from fastapi.testclient import TestClient  # noqa: E402
from nanochat_testing.data import TINY_DATA  # noqa: E402
from nanochat_testing.servers import start_redis  # noqa: E402
from ray import cluster_utils  # noqa: E402
from trainer.api import create_app  # noqa: E402
from trainer.db import TERMINAL  # noqa: E402
from trainer.settings import Settings  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY = {**TINY_DATA, "overwrite": True}
WORKER_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def head_rss(cluster: cluster_utils.Cluster) -> dict[str, float]:
    """RSS (MiB) of each process type of the head node, and their sum."""
    out: dict[str, float] = {}
    for kind, infos in cluster.head_node.all_processes.items():
        out[kind] = round(sum(rss_mib(info.process.pid) for info in infos), 1)
    out["total"] = round(sum(out.values()), 1)
    return out


def first_progress(path: Path, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                event = json.loads(line)
                if event["type"] == "progress":
                    return event["ts"]
        time.sleep(0.02)
    raise TimeoutError(f"no progress event in {path} within {timeout} s")


def wait_status(api: TestClient, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not end within {timeout} s")


def worker_env(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINER_")}
    for key, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"TRAINER_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return {**env, **WORKER_ENV}


def measure(settings: Settings, resources: dict[str, int], repeats: int, work: Path, name: str) -> list[float]:
    """POST -> first progress (s) of `repeats` jobs on `resources`, with one worker process."""
    logs = [open(work / f"{name}-worker.log", "wb")]
    procs = [
        subprocess.Popen([sys.executable, "-m", "trainer", "worker"], env=worker_env(settings), stdout=log, stderr=log)
        for log in logs
    ]
    times = []
    try:
        with TestClient(create_app(settings)) as api:
            for _ in range(repeats):
                t0 = time.time()
                response = api.post(
                    "/v1/jobs",
                    json={"stage": "make_data", "options": TINY, "resources": resources},
                    headers=AUTH,
                )
                assert response.status_code == 202, response.text
                job_id = response.json()["id"]
                times.append(first_progress(settings.runs_dir / "jobs" / job_id / "events.jsonl") - t0)
                job = wait_status(api, job_id)
                assert job["status"] == "succeeded", job
                events = (settings.runs_dir / "jobs" / job_id / "events.jsonl").read_text().splitlines()
                started = next(json.loads(e)["ts"] for e in events if json.loads(e)["type"] == "started")
                log = (settings.runs_dir / "jobs" / job_id / "log-node0.txt").read_text()
                notes = [line for line in log.splitlines() if line.startswith("[trainer] ray:")]
                print(
                    f"{name}: POST -> claimed {job['started_at'] - t0:.1f} s, -> stage started {started - t0:.1f} s,"
                    f" -> first progress {times[-1]:.1f} s {notes}"
                )
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        for log in logs:
            log.close()
    return times


def settings_for(work: Path, redis_url: str, name: str, **extra: object) -> Settings:
    return Settings(
        database_url=f"sqlite:///{work / f'{name}.db'}",
        redis_url=redis_url,
        queue_name=f"bench-{name}",
        write_token=TOKEN,
        data_dir=work / "data",
        runs_dir=work / f"runs-{name}",
        registry_url="http://127.0.0.1:9",
        log_level="WARNING",
        **extra,
    )


def bench(repeats: int, skip_local: bool, work: Path) -> dict:
    redis = start_redis()
    result: dict = {"rows": []}
    try:
        if not skip_local:
            one_node = {"nnodes": 1, "nproc_per_node": 2}
            local = measure(settings_for(work, redis.url, "local"), one_node, repeats, work, "local")
            result["rows"].append(("POST -> first progress, 1 node x 2 processes, local executor", local))
        t0 = time.monotonic()
        cluster = cluster_utils.Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "node_ip_address": "127.0.0.1",
                "include_dashboard": False,
                # Ray starts its workers at niceness 15; the stages are the cluster's work.
                "_system_config": {"worker_niceness": 0},
            },
        )
        for _ in range(2):
            cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        result["cluster_start_s"] = round(time.monotonic() - t0, 1)
        try:
            result["head_rss_idle_mib"] = head_rss(cluster)
            ray_settings = settings_for(
                work, redis.url, "ray", executor="ray", ray_address=cluster.address, ray_gpus=False
            )
            times = measure(ray_settings, {"nnodes": 2, "nproc_per_node": 1}, repeats, work, "ray")
            result["rows"].append(("POST -> first progress, 2 nodes, Ray executor", times))
            result["head_rss_after_mib"] = head_rss(cluster)
        finally:
            cluster.shutdown()
    finally:
        redis.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--work", type=Path, help="Folder for the run, kept (a temp folder by default).")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = bench(args.repeats, args.skip_local, work)
    load_after = os.getloadavg()[0]
    print(f"{os.cpu_count()} CPUs, load average {load_before:.1f} -> {load_after:.1f}, n={args.repeats}")
    for name, times in result["rows"]:
        print(f"{name:<60} median {statistics.median(times):6.2f} s  all {[round(t, 2) for t in times]}")
    print(f"Ray cluster start (head + 2 nodes): {result['cluster_start_s']} s")
    print(f"Ray head RSS idle (MiB): {result['head_rss_idle_mib']}")
    print(f"Ray head RSS after the jobs (MiB): {result['head_rss_after_mib']}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "multi_node.json"
    rows = [{"name": n, "median_s": statistics.median(t), "all_s": t} for n, t in result.pop("rows")]
    out.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "load_average": [load_before, load_after],
                "rows": rows,
                **result,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
