"""The job metrics Prometheus scrapes, read from the job records and the queue at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily
from sqlalchemy import func, select

from trainer.db import STATUSES, TERMINAL, Job
from trainer.deps import State
from trainer.dispatch import queue_depth

DURATION_BUCKETS = (10, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600, 72 * 3600)


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
        durations = HistogramMetricFamily(
            "trainer_job_duration_seconds", "Run time of ended jobs by outcome.", labels=["outcome"]
        )
        with self.state.db.session() as s:
            counts = dict(s.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            rows = s.execute(
                select(Job.status, Job.finished_at - func.coalesce(Job.started_at, Job.created_at)).where(
                    Job.status.in_(TERMINAL), Job.finished_at.is_not(None)
                )
            ).all()
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
