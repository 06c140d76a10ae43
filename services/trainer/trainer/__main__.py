"""`python -m trainer api | worker | worker-health | doctor`: the service's entry points."""

from __future__ import annotations

import argparse
import sys

from service_kit import logs

from trainer.doctor import PARTS
from trainer.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer", description="The nanochat trainer service.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("api", help="Serve the jobs API (TRAINER_API_HOST:TRAINER_API_PORT).")
    worker = sub.add_parser("worker", help="Run a worker: take jobs off the queue and run their stages.")
    worker.add_argument("--burst", action="store_true", help="Exit once the queue is empty.")
    sub.add_parser("worker-health", help="Exit 0 while the worker's liveness file is fresh.")
    doctor = sub.add_parser("doctor", help="Report whether the Docker engine, GPUs and each service are reachable.")
    doctor.add_argument("--json", action="store_true", help="Print the report as JSON.")
    doctor.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="PART",
        choices=PARTS,
        help="Also fail when this part is not up (repeatable).",
    )
    args = parser.parse_args(argv)
    logs.configure(get_settings().log_level)
    if args.command == "api":
        from trainer.api import main as api_main

        api_main()
    elif args.command == "worker":
        from trainer.worker import main as worker_main

        worker_main(burst=args.burst)
    elif args.command == "doctor":
        from trainer.doctor import main as doctor_main

        return doctor_main(get_settings(), as_json=args.json, require=args.require)
    else:
        from trainer.worker import worker_health

        return worker_health()
    return 0


if __name__ == "__main__":
    sys.exit(main())
