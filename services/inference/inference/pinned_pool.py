"""Pinned versions: registry versions other than the served one, loaded on demand beside it.

At most `capacity` (INFERENCE_MAX_PINNED) are loaded or loading at once, each in a model process
of its own. A request for one that is not loaded starts its load (download, then
`ServedModel.load`) on a thread and waits for it, up to the load timeout; requests for a version
that is loading wait on the same load. When the pool is full, the least recently used pinned
model with no open request is stopped to make room; a model with open streams is never evicted,
so when every one is busy (or loading) the request is refused (`PinnedBusy`, a 503).

A finished load counts its waiters as the model's holders before anyone else can see it, so a
request for another version cannot evict a model between its load and its first request.

The pool shares the manager's lock and its retiring list: a pinned model promoted to served (the
serving alias moved to it) or dropped while it streams (its version deleted) keeps its holders,
and the manager's `release` frees it after the last one as it does a swapped-out served model.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from inference.served import ModelManager, ServedModel

log = logging.getLogger("inference.pinned")


class PinnedBusy(Exception):
    """Every pinned model has open requests (or is loading); none can be evicted."""


class PinnedLoading(Exception):
    """The version is still loading after the wait bound; it goes on loading."""


class PinnedLoadFailed(Exception):
    """The version could not be downloaded or loaded (the message says why)."""


@dataclass(eq=False)
class _Load:
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    waiters: int = 0  # requests waiting on it; guarded by the manager's lock
    dropped: str | None = None  # why it must not be pinned when it finishes (its version deleted)


class PinnedPool:
    def __init__(self, manager: ModelManager, capacity: int, load: Callable[[int], ServedModel]):
        self.manager, self.capacity, self._load_version = manager, capacity, load
        self._lock = manager._lock
        self._models: dict[int, ServedModel] = {}
        self._loads: dict[int, _Load] = {}
        self._closed = False
        # Read by /metrics (`inference.metrics.PinnedMetrics`); guarded by the lock.
        self.evictions = 0
        self.loads = {"ok": 0, "failed": 0}

    def loaded(self) -> list[ServedModel]:
        """The pinned models loaded now, in version order."""
        with self._lock:
            return [self._models[v] for v in sorted(self._models)]

    def loading(self) -> int:
        with self._lock:
            return len(self._loads)

    def versions(self) -> list[int]:
        """The versions loaded or loading now."""
        with self._lock:
            return sorted({*self._models, *self._loads})

    def get(self, version: int) -> ServedModel | None:
        with self._lock:
            return self._models.get(version)

    async def acquire(self, version: int, timeout: float) -> ServedModel:
        """Hold the pinned model of `version`, loading it first (waiting up to `timeout` seconds)."""
        with self._lock:
            served = self._models.get(version)
            if served is not None and not served.scheduler.alive:
                self._stop_later(self._models.pop(version))  # killed: load it again below
                served = None
            if served is not None:
                served.active += 1
                served.last_used = time.monotonic()
                return served
            load = self._loads.get(version)
            if load is None:
                if self._closed:
                    raise PinnedLoadFailed("the server is shutting down")
                self._make_room()
                load = self._loads[version] = _Load()
                threading.Thread(target=self._run_load, args=(version, load), name="inference-pin", daemon=True).start()
            load.waiters += 1
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(load.future)), timeout)
        except (TimeoutError, asyncio.CancelledError) as e:
            self._leave(load)
            if isinstance(e, TimeoutError):
                raise PinnedLoading(f"version {version} is still loading after {timeout:g} s; retry shortly") from None
            raise

    def _leave(self, load: _Load) -> None:
        """A waiter gives up: if the load finished meanwhile it already holds the model; let go."""
        with self._lock:
            done = load.future.done() and load.future.exception() is None
            if not done:
                load.waiters -= 1
        if done:
            self.manager.release(load.future.result())

    def _make_room(self) -> None:
        """Under the lock: stop the least recently used idle model if the pool is full."""
        if len(self._models) + len(self._loads) < self.capacity:
            return
        idle = [m for m in self._models.values() if m.active == 0]
        if not idle:
            raise PinnedBusy(
                f"all {self.capacity} pinned model(s) are busy with open requests or loading; retry shortly"
            )
        victim = min(idle, key=lambda m: m.last_used)
        del self._models[victim.info.version]
        self.evictions += 1
        log.info("evicting pinned %s (least recently used)", victim.model_id)
        self._stop_later(victim)

    def _run_load(self, version: int, load: _Load) -> None:
        try:
            served = self._load_version(version)
        except Exception as e:
            log.warning("loading pinned version %s failed: %s", version, e)
            with self._lock:
                del self._loads[version]
                self.loads["failed"] += 1
                load.future.set_exception(PinnedLoadFailed(f"loading version {version} failed: {e}"))
            return
        with self._lock:
            del self._loads[version]
            refused = "the server is shutting down" if self._closed else load.dropped
            self.loads["ok"] += 1
            if refused is None:
                served.active, served.last_used = load.waiters, time.monotonic()
                self._models[version] = served
                load.future.set_result(served)
            else:
                load.future.set_exception(PinnedLoadFailed(f"version {version}: {refused}"))
        if refused is not None:
            served.close()
        else:
            log.info("pinned %s loaded from %s", served.model_id, served.info.folder)

    def take(self, version: int) -> ServedModel | None:
        """Remove and return the loaded model of `version` (to serve it), holders and all; one
        still loading is waited for (blocking: the manager's thread), not loaded a second time."""
        with self._lock:
            load = self._loads.get(version)
        if load is not None:
            concurrent.futures.wait([load.future])
        with self._lock:
            served = self._models.get(version)
            if served is None or not served.scheduler.alive:
                return None
            return self._models.pop(version)

    def drop(self, version: int, reason: str) -> None:
        """Stop pinning `version`: at once when idle, else after its open requests end; a load in
        flight is stopped when it finishes."""
        with self._lock:
            served = self._models.pop(version, None)
            if served is None:
                if version in self._loads:
                    self._loads[version].dropped = reason
                return
            served.retired = True
            busy = served.active > 0
            if busy:
                self.manager.retiring.append(served)
        log.warning("dropped pinned %s: %s", served.model_id, reason)
        if not busy:
            self._stop_later(served)

    def close(self) -> list[ServedModel]:
        """Forget every pinned model and refuse new loads; the caller stops what is returned."""
        with self._lock:
            self._closed = True
            models, self._models = list(self._models.values()), {}
        return models

    @staticmethod
    def _stop_later(served: ServedModel) -> None:
        # Stopping joins the model process (up to its timeout): never under the lock or on the event loop.
        threading.Thread(target=served.close, name="inference-unpin", daemon=True).start()
