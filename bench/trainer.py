"""Trainer latencies on this machine: POST /v1/jobs -> the stage's `started` and first `progress`
event, and cancel -> no process of the job left.

    uv run python bench/trainer.py [--repeats 3] [--nproc 1 2]

Runs the real stack minus the registry (make_data registers nothing): a redis-server on a free
port, the API in-process, one `python -m trainer worker` process, real torchrun on CPU. The POST
rows run make_data with tiny options; the cancel rows cancel a make_data asked for 3M synthetic
documents once its first progress event is out. Goals (DESIGN.md): started < 5 s, cancel < 10 s.
Prints a table and writes bench/results/trainer.json.
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

# This file is bench/trainer.py: its folder, first on sys.path, would shadow the trainer package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from fastapi.testclient import TestClient  # noqa: E402
from nanochat_testing.data import TINY_DATA  # noqa: E402
from nanochat_testing.servers import start_redis  # noqa: E402
from trainer.api import create_app  # noqa: E402
from trainer.db import TERMINAL  # noqa: E402
from trainer.procs import job_processes, node_tag  # noqa: E402
from trainer.settings import Settings  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOKEN = "bench-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TINY = {**TINY_DATA, "overwrite": True}


def first_events(path: Path, wanted: tuple[str, ...], timeout: float = 120) -> dict[str, float]:
    """Wall time (the stage's `ts`) of the first event of each wanted type."""
    deadline = time.monotonic() + timeout
    found: dict[str, float] = {}
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                event = json.loads(line)
                if event["type"] in wanted and event["type"] not in found:
                    found[event["type"]] = event["ts"]
            if all(w in found for w in wanted):
                return found
        time.sleep(0.02)
    raise TimeoutError(f"no {wanted} events in {path} within {timeout} s")


def wait_status(api: TestClient, job_id: str, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in TERMINAL:
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not end within {timeout} s")


def bench(repeats: int, nprocs: list[int], work: Path) -> list[tuple[str, float, float, str]]:
    redis = start_redis()
    settings = Settings(
        database_url=f"sqlite:///{work / 'trainer.db'}",
        redis_url=redis.url,
        write_token=TOKEN,
        data_dir=work / "data",
        runs_dir=work / "runs",
        registry_url="http://127.0.0.1:9",
        heartbeat_interval=1.0,
        cancel_grace=5.0,
        log_level="WARNING",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINER_")}
    for key, value in settings.model_dump(mode="json").items():
        if value is not None:
            env[f"TRAINER_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    worker_log = open(work / "worker.log", "wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "trainer", "worker"], env=env, stdout=worker_log, stderr=subprocess.STDOUT
    )
    rows = []
    try:
        with TestClient(create_app(settings)) as api:
            for nproc in nprocs:
                started, progress = [], []
                for _ in range(repeats):
                    t0 = time.time()
                    job_id = api.post(
                        "/v1/jobs",
                        json={"stage": "make_data", "options": TINY, "resources": {"nproc_per_node": nproc}},
                        headers=AUTH,
                    ).json()["id"]
                    seen = first_events(settings.runs_dir / "jobs" / job_id / "events.jsonl", ("started", "progress"))
                    started.append(seen["started"] - t0)
                    progress.append(seen["progress"] - t0)
                    job = wait_status(api, job_id)
                    assert job["status"] == "succeeded", job
                rows.append(
                    (f"POST -> started event (make_data, nproc {nproc})", statistics.median(started), max(started), "s")
                )
                rows.append(
                    (
                        f"POST -> first progress event (make_data, nproc {nproc})",
                        statistics.median(progress),
                        max(progress),
                        "s",
                    )
                )
            cancels, statuses = [], []
            for _ in range(repeats):
                job_id = api.post(
                    "/v1/jobs",
                    json={
                        "stage": "make_data",
                        "options": {**TINY, "synthetic_docs": 3_000_000, "docs_per_shard": 100_000},
                    },
                    headers=AUTH,
                ).json()["id"]
                first_events(settings.runs_dir / "jobs" / job_id / "events.jsonl", ("progress",))
                job = api.get(f"/v1/jobs/{job_id}").json()
                tag, pgid = node_tag(job_id, 0), job["nodes"][0]["pgid"]
                t0 = time.monotonic()
                api.post(f"/v1/jobs/{job_id}/cancel", headers=AUTH)
                while job_processes(pgid, tag):
                    time.sleep(0.01)
                cancels.append(time.monotonic() - t0)
                job = wait_status(api, job_id)
                statuses.append(time.monotonic() - t0)
                assert job["status"] == "cancelled", job
            rows.append(
                ("cancel -> no process of the job left (make_data)", statistics.median(cancels), max(cancels), "s")
            )
            rows.append(("cancel -> job status cancelled", statistics.median(statuses), max(statuses), "s"))
    finally:
        worker.kill()
        worker.wait()
        worker_log.close()
        redis.stop()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--work", type=Path, help="Folder for the run (a temp folder by default).")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        load_before = os.getloadavg()[0]
        rows = bench(args.repeats, args.nproc, work)
        load_after = os.getloadavg()[0]
    # torchrun's own start (importing torch) dominates the POST rows, so they grow with the load.
    print(
        f"{'measurement':<58} {'median':>8} {'max':>8}  unit   (n={args.repeats}, {os.cpu_count()} CPUs, "
        f"load average {load_before:.1f} -> {load_after:.1f})"
    )
    for name, median, worst, unit in rows:
        print(f"{name:<58} {median:>8.2f} {worst:>8.2f}  {unit}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "trainer.json"
    out.write_text(
        json.dumps(
            {
                "machine": platform.platform(),
                "cpus": os.cpu_count(),
                "repeats": args.repeats,
                "load_average": [load_before, load_after],
                "results": [{"name": n, "median": m, "max": w, "unit": u} for n, m, w, u in rows],
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
