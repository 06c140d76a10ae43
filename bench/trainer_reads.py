"""What the trainer API's reads of a long job cost on this machine: `GET /v1/jobs/{id}/metrics`
over a large events file (the first read, a poll after the stage appended 100 events, and a full
parse, which every poll cost before the curves were kept), and a plain `GET .../logs` of a large
log (the default 1 MiB window and a 64 KiB tail, against reading the whole file, as it did before).

    uv run python bench/trainer_reads.py [--events 200000] [--log-mib 256]

A redis-server on a free port and the API in-process (TestClient); no worker. Peak RSS is the
process's, measured after each step, so the whole-file read goes last. Prints a table and writes
bench/results/trainer_reads.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

# This file is bench/trainer_reads.py: its folder, first on sys.path, would shadow the trainer package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from fastapi.testclient import TestClient  # noqa: E402
from nanochat_testing.data import TINY_DATA  # noqa: E402
from nanochat_testing.servers import start_redis  # noqa: E402
from trainer.api import create_app  # noqa: E402
from trainer.curves import CurveCache  # noqa: E402
from trainer.paths import events_path, log_path  # noqa: E402
from trainer.settings import Settings  # noqa: E402

RESULTS = Path(__file__).parent / "results"
TOKEN = "bench-token"


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def progress(step: int) -> str:
    return json.dumps({"stage": "base_train", "type": "progress", "step": step, "loss": 1 / step, "lr": 0.01}) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--log-mib", type=int, default=256)
    args = parser.parse_args()
    redis = start_redis()
    rows: list[dict] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            settings = Settings(
                database_url=f"sqlite:///{tmp}/trainer.db",
                redis_url=redis.url,
                write_token=TOKEN,
                data_dir=Path(tmp) / "data",
                runs_dir=Path(tmp) / "runs",
                log_level="WARNING",
            )
            with TestClient(create_app(settings)) as api:
                job = api.post(
                    "/v1/jobs",
                    json={"stage": "make_data", "options": TINY_DATA},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                ).json()["id"]
                events = events_path(settings, job)
                events.parent.mkdir(parents=True, exist_ok=True)
                events.write_text("".join(progress(i) for i in range(1, args.events + 1)))
                url = f"/v1/jobs/{job}/metrics"
                first, _ = timed(lambda: api.get(url))
                rows.append({"read": f"metrics, first read ({args.events} events)", "s": first, "rss_mib": rss_mib()})
                with open(events, "a") as f:
                    f.write("".join(progress(i) for i in range(args.events + 1, args.events + 101)))
                poll, _ = timed(lambda: api.get(url))
                rows.append({"read": "metrics, poll after 100 more events", "s": poll, "rss_mib": rss_mib()})
                full, _ = timed(lambda: CurveCache().result(events, None, None))
                rows.append({"read": "metrics, full parse (each poll before)", "s": full, "rss_mib": rss_mib()})
                log = log_path(settings, job, 0)
                with open(log, "wb") as f:
                    line = b"step 00000 | loss 1.234 | lr 0.01 | tok/s 12345 | a line of a training log\n"
                    for _ in range(args.log_mib):
                        f.write(line * ((1 << 20) // len(line)))
                logs = f"/v1/jobs/{job}/logs"
                for name, params in [("logs, default window", {}), ("logs, tail=65536", {"tail": 65536})]:
                    took, r = timed(lambda params=params: api.get(logs, params=params))
                    rows.append(
                        {
                            "read": f"{name} ({args.log_mib} MiB log)",
                            "s": took,
                            "bytes": len(r.content),
                            "rss_mib": rss_mib(),
                        }
                    )
                took, data = timed(lambda: log.read_bytes().decode("utf-8", "replace"))
                rows.append(
                    {
                        "read": "whole log read (each plain read before)",
                        "s": took,
                        "bytes": len(data),
                        "rss_mib": rss_mib(),
                    }
                )
    finally:
        redis.stop()
    for row in rows:
        print(f"{row['read']:<52} {row['s'] * 1000:9.1f} ms   peak RSS {row['rss_mib']:7.1f} MiB")
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": platform.platform(), "python": platform.python_version(), "rows": rows}
    (RESULTS / "trainer_reads.json").write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
