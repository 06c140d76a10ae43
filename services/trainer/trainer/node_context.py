"""What every part of a node's run shares: the process's connections, the exception that ends a
node's run, and registry calls retried with backoff (each retry noted in the node's log)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from redis import Redis

from trainer.db import Database
from trainer.paths import log_path
from trainer.registry import Registry, RegistryUnavailable, make_registry
from trainer.settings import Settings, get_settings

T = TypeVar("T")


@dataclass
class Context:
    settings: Settings
    db: Database
    redis: Redis
    registry: Registry
    name: str


_context: Context | None = None


def context() -> Context:
    """This process's settings and connections, made on first use (RQ imports `run_node` by name)."""
    global _context
    if _context is None:
        settings = get_settings()
        _context = Context(
            settings,
            Database(settings.database_url),
            Redis.from_url(settings.redis_url),
            make_registry(settings),
            f"{settings.host}.{os.getpid()}",
        )
    return _context


class StepFailed(Exception):
    """A step ended the node's run: `status` is failed, cancelled or interrupted (worker shutdown)."""

    def __init__(self, status: str, message: str | None, log_tail: str | None = None):
        super().__init__(message or status)
        self.status, self.message, self.log_tail = status, message, log_tail


@dataclass
class Node:
    """One node of one job, as the parts of its run see it."""

    ctx: Context
    job_id: str
    rank: int

    @property
    def log_path(self) -> Path:
        return log_path(self.ctx.settings, self.job_id, self.rank)

    def note(self, message: str) -> None:
        """A trainer line in the node's log, next to the stage's output (the UI shows both)."""
        with open(self.log_path, "a") as f:
            f.write(f"[trainer] {message}\n")

    def with_retries(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, tried `upload_retries` more times with doubling delays while the registry is
        unreachable; a rejection is not retried."""
        s = self.ctx.settings
        attempts, attempt = s.upload_retries + 1, 1
        while True:
            try:
                return call()
            except RegistryUnavailable as e:
                if attempt == attempts:
                    raise RegistryUnavailable(
                        f"{what}: the registry failed {attempts} times; last error: {e}"
                    ) from None
                delay = s.upload_backoff * 2 ** (attempt - 1)
                self.note(f"{what} failed (attempt {attempt}/{attempts}): {e}; retrying in {delay:g} s")
                time.sleep(delay)
                attempt += 1
