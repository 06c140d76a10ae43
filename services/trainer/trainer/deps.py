"""What the routes take from the request: the API's state (settings, database, Redis, registry,
reaper, the log followers, the curves read so far) and the job a path names."""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from redis import Redis

from trainer.curves import CurveCache
from trainer.db import Database, Job
from trainer.reaper import Reaper
from trainer.registry import Registry, make_registry
from trainer.settings import Settings
from trainer.tail import Followers

JOB_ID = re.compile(r"[0-9a-f]{32}")


class State:
    def __init__(self, settings: Settings, registry: Registry | None):
        self.settings = settings
        self.db = Database(settings.database_url, settings.db_busy_timeout)
        self.redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.registry = registry or make_registry(settings)
        self.reaper = Reaper(settings, self.db, self.redis)
        self.followers = Followers(self.db, settings.max_followers, settings.follow_poll_s)
        self.curves = CurveCache()


def get_state(request: Request) -> State:
    return request.app.state.trainer


StateDep = Annotated[State, Depends(get_state)]


def load_job(state: State, job_id: str) -> Job:
    # Job ids are uuid4 hex: anything else names no job (and never reaches the database, where a
    # NUL byte or a kilobyte of text would be an error rather than a miss).
    if not JOB_ID.fullmatch(job_id):
        raise HTTPException(404, f"no job {job_id[:64]!r}")
    with state.db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        _ = job.nodes  # loaded now: the session closes before the response is built
        return job
