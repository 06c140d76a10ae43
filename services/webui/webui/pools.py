"""The proxy's connections: for each service, one pool for short requests and one for streams,
and the count of its open streams, so that streams held open by anyone (a log follow needs no
sign-in) can neither take the connections other calls need nor grow without bound."""

import httpx

from webui.settings import SERVICES, Settings


class Pools:
    def __init__(self, settings: Settings):
        self.max_streams = settings.max_streams
        # No read timeout: a log follow or a long generation may be quiet for a long time.
        timeout = httpx.Timeout(None, connect=settings.connect_timeout_s, pool=settings.pool_timeout_s)
        short = httpx.Limits(max_connections=settings.max_short_connections, max_keepalive_connections=20)
        streams = httpx.Limits(max_connections=settings.max_streams, max_keepalive_connections=20)
        self.short = {s: httpx.AsyncClient(timeout=timeout, limits=short, follow_redirects=False) for s in SERVICES}
        self.streams = {s: httpx.AsyncClient(timeout=timeout, limits=streams, follow_redirects=False) for s in SERVICES}
        self.open_streams = dict.fromkeys(SERVICES, 0)

    def client(self, service: str, stream: bool) -> httpx.AsyncClient:
        return (self.streams if stream else self.short)[service]

    def take_stream(self, service: str) -> bool:
        """Count one more open stream to `service`; False when it already has `max_streams`."""
        # No await between the check and the count: on one event loop this cannot race.
        if self.open_streams[service] >= self.max_streams:
            return False
        self.open_streams[service] += 1
        return True

    def release_stream(self, service: str) -> None:
        self.open_streams[service] -= 1

    async def aclose(self) -> None:
        for client in [*self.short.values(), *self.streams.values()]:
            await client.aclose()
