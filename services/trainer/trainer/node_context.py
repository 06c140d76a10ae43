"""What every part of a node's run shares: the process's connections, the exception that ends a
node's run, and registry calls retried with backoff (tenacity; each retry noted in the node's log)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from nanochat_contracts.job_folder import log_path
from redis import Redis
from tenacity import RetryCallState, RetryError, Retrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from trainer.db import Database
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
            Database(settings.database_url, settings.db_busy_timeout),
            # Timeouts: a Redis that stops answering (rather than refusing) must not hang the
            # stop check; RQ's own blocking dequeue has a connection of its own (`worker.main`).
            Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5),
            make_registry(settings),
            f"{settings.host}.{os.getpid()}",
        )
    return _context


class StepFailed(Exception):
    """A step ended the node's run: `status` is failed, cancelled or interrupted (worker shutdown).
    `infrastructure`: the failure was the platform's (a store gone too long, a trainer error), not
    the stage's own, so the job's retry policy always applies to it."""

    def __init__(self, status: str, message: str | None, log_tail: str | None = None, infrastructure: bool = False):
        super().__init__(message or status)
        self.status, self.message, self.log_tail = status, message, log_tail
        self.infrastructure = infrastructure


@dataclass
class Node:
    """One node of one job, as the parts of its run see it."""

    ctx: Context
    job_id: str
    rank: int

    @property
    def log_path(self) -> Path:
        return log_path(self.ctx.settings.runs_dir, self.job_id, self.rank)

    def note(self, message: str) -> None:
        """A trainer line in the node's log, next to the stage's output (the UI shows both)."""
        with open(self.log_path, "a") as f:
            f.write(f"[trainer] {message}\n")

    def with_retries(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, tried `upload_retries` more times with doubling delays while the registry is
        unreachable; a rejection is not retried."""
        s = self.ctx.settings
        attempts = s.upload_retries + 1

        def note_retry(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            delay = state.next_action.sleep if state.next_action else 0.0
            self.note(f"{what} failed (attempt {state.attempt_number}/{attempts}): {error}; retrying in {delay:g} s")

        retrying = Retrying(
            retry=retry_if_exception_type(RegistryUnavailable),
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=s.upload_backoff, min=0, max=3600),
            before_sleep=note_retry,
        )
        try:
            return retrying(call)
        except RetryError as e:
            last = e.last_attempt.exception()
            raise RegistryUnavailable(f"{what}: the registry failed {attempts} times; last error: {last}") from None
