"""Registry events on Redis: pub/sub channel `nanochat:events` plus a capped stream for late readers.

The payload is the contract `nanochat_contracts.registry_events.RegistryEvent`. `publish` only
queues the event; a background thread delivers it and, while Redis is unreachable, keeps it and
retries, so a Redis outage never fails a commit.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque

from nanochat_contracts.registry_events import EventType, RegistryEvent
from nanochat_contracts.stages import Stage

log = logging.getLogger("registry.events")

MAX_QUEUED = 10_000


class EventPublisher:
    def __init__(self, redis_url: str | None, channel: str, stream: str, stream_maxlen: int, retry_s: float = 2.0):
        self.channel, self.stream, self.stream_maxlen, self.retry_s = channel, stream, stream_maxlen, retry_s
        self.queue: deque[dict] = deque(maxlen=MAX_QUEUED)
        self.cond = threading.Condition()
        self.stopped = False
        self.redis = None
        self.thread: threading.Thread | None = None
        if redis_url:
            import redis

            self.redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
            self.thread = threading.Thread(target=self._run, name="registry-events", daemon=True)
            self.thread.start()

    def publish(self, type_: EventType, name: str, version: int, stage: Stage, alias: str | None = None) -> dict:
        event = RegistryEvent(type=type_, name=name, version=version, stage=stage, alias=alias).payload()
        if self.redis is None:
            return event
        with self.cond:
            self.queue.append(event)
            self.cond.notify()
        return event

    def _deliver(self, event: dict) -> None:
        payload = json.dumps(event)
        pipe = self.redis.pipeline(transaction=False)
        pipe.publish(self.channel, payload)
        pipe.xadd(self.stream, {"event": payload}, maxlen=self.stream_maxlen, approximate=True)
        pipe.execute()

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.queue and not self.stopped:
                    self.cond.wait()
                if not self.queue:
                    return
                event = self.queue[0]
            try:
                self._deliver(event)
            except Exception as e:  # any Redis failure: keep the event, retry later
                log.warning("redis unreachable, %d event(s) waiting: %s", len(self.queue), e)
                with self.cond:
                    self.cond.wait(self.retry_s)
                    if self.stopped:
                        return
                continue
            with self.cond:
                if self.queue and self.queue[0] is event:
                    self.queue.popleft()

    def pending(self) -> int:
        return len(self.queue)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (waiting up to `timeout` s), then stop the thread."""
        if self.thread is None:
            return
        deadline = time.monotonic() + timeout
        while self.queue and time.monotonic() < deadline:
            time.sleep(0.05)
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join(timeout=2)
        self.redis.close()
