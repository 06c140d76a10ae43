"""Riding out a Redis or database blip: a running job must not fail because a store restarted.

Calls to Redis and the database during a node's run go through tenacity. A call that must land
(the stage's process group, the job's current step, the final metrics) is retried while the store
is unreachable, up to `store_outage_limit`. A check that is polled anyway (the stop check) goes
through `Outage`: while its store is unreachable it answers a default and logs the outage once;
only an outage longer than the limit becomes `StoreUnreachable`, which ends the node's attempt as
an infrastructure failure (retried by the job's policy).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import redis.exceptions
import sqlalchemy.exc
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

log = logging.getLogger("trainer.worker")

T = TypeVar("T")

# Connection refused or reset, a timeout, SQLite's "database is locked", a server going away.
TRANSIENT: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
)


class StoreUnreachable(RuntimeError):
    """Redis or the database stayed unreachable longer than `store_outage_limit`."""


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning("%s failed (try %d), retrying: %s", what, state.attempt_number, error)

    return before_sleep


def retry_store(what: str, call: Callable[[], T], limit: float) -> T:
    """`call()`, retried with backoff while its store is unreachable, for up to `limit` seconds."""
    retrying = Retrying(
        retry=retry_if_exception_type(TRANSIENT),
        stop=stop_after_delay(limit),
        wait=wait_exponential(multiplier=0.2, max=2.0),
        before_sleep=_log_retry(what),
        reraise=True,
    )
    return retrying(call)


class Outage:
    """One store as a polled check sees it: reachable, or unreachable since some time."""

    def __init__(self, store: str, limit: float):
        self.store, self.limit = store, limit
        self.since: float | None = None

    def check(self, call: Callable[[], T], default: T) -> T:
        """`call()`'s answer; `default` while the store is unreachable (within the limit)."""
        try:
            value = call()
        except TRANSIENT as e:
            now = time.monotonic()
            if self.since is None:
                self.since = now
                log.warning("%s unreachable; the job keeps running for up to %g s: %s", self.store, self.limit, e)
            if now - self.since > self.limit:
                raise StoreUnreachable(f"{self.store} unreachable for {now - self.since:.0f} s: {e}") from None
            return default
        if self.since is not None:
            log.warning("%s reachable again after %.1f s", self.store, time.monotonic() - self.since)
            self.since = None
        return value
