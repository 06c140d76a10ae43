"""What the routes take from the request: the API's state (settings, database, Redis, registry,
reaper) and the job a path names."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from redis import Redis

from trainer.db import Database, Job
from trainer.reaper import Reaper
from trainer.registry import Registry, make_registry
from trainer.settings import Settings


class State:
    def __init__(self, settings: Settings, registry: Registry | None):
        self.settings = settings
        self.db = Database(settings.database_url, settings.db_busy_timeout)
        self.redis = Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.registry = registry or make_registry(settings)
        self.reaper = Reaper(settings, self.db, self.redis)


def get_state(request: Request) -> State:
    return request.app.state.trainer


StateDep = Annotated[State, Depends(get_state)]


def load_job(state: State, job_id: str) -> Job:
    with state.db.session() as s:
        job = s.get(Job, job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        _ = job.nodes  # loaded now: the session closes before the response is built
        return job
