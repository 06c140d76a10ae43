"""Failed sign-ins counted per client address: past `login_max_failures` in a window of
`login_window_s`, that address gets 429s (with Retry-After) until the window has passed, whatever
token it sends, so guessing the admin token costs a window per few tries."""

import math
import time
from collections import deque

from webui.settings import Settings

# Addresses tracked at most; beyond, the least recently failed are forgotten first.
MAX_CLIENTS = 10_000


class LoginLimit:
    def __init__(self, settings: Settings):
        self.max_failures = settings.login_max_failures
        self.window_s = settings.login_window_s
        self.failures: dict[str, deque[float]] = {}

    def retry_after(self, client: str) -> int | None:
        """Seconds until `client` may try again, or None when it may now."""
        now = time.monotonic()
        times = self.failures.get(client)
        if times is None:
            return None
        while times and times[0] <= now - self.window_s:
            times.popleft()
        if not times:
            del self.failures[client]
            return None
        if len(times) < self.max_failures:
            return None
        return max(1, math.ceil(times[0] + self.window_s - now))

    def failed(self, client: str) -> None:
        times = self.failures.pop(client, None) or deque()
        times.append(time.monotonic())
        self.failures[client] = times  # re-inserted: the dict's order is the order of last failure
        while len(self.failures) > MAX_CLIENTS:
            del self.failures[next(iter(self.failures))]
