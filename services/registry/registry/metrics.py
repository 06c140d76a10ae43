"""The registry's own Prometheus metrics; the service kit adds the HTTP ones to the same registry."""

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.uploaded = Counter("registry_upload_bytes_total", "bytes received in uploads", registry=self.registry)
        self.downloaded = Counter("registry_download_bytes_total", "bytes sent in downloads", registry=self.registry)
        self.events_pending = Gauge("registry_events_pending", "events waiting for Redis", registry=self.registry)
