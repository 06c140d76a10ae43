"""A daemon thread that calls `tick` every `interval` seconds until stopped: the node heartbeat
and the reaper. A failing tick is logged and the next one still runs, so one bad database round
trip never ends the loop; an unreachable store is one warning line, not a traceback per tick."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from trainer.outage import TRANSIENT

log = logging.getLogger("trainer.periodic")


class Periodic:
    def __init__(self, name: str, interval: float, tick: Callable[[], object]):
        self.name, self.interval, self.tick = name, interval, tick
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.tick()
            except TRANSIENT as e:
                log.warning("%s skipped: %s", self.name, e)
            except Exception:
                log.exception("%s failed", self.name)
