"""Prometheus metrics of the inference server (vLLM's set, under the `inference_` prefix).

Histograms: time to first token, inter-token latency, end-to-end request latency. Counters:
prompt and generated tokens, requests by endpoint and outcome. Gauges read at scrape time from
the served model's scheduler: running rows, waiting requests, KV-cache slot and position use.
Each app has its own registry, so several apps (tests) can live in one process; the service kit
adds its HTTP metrics to it and serves it at /metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from nanochat.scheduler import Stats
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    20.0,
    40.0,
    80.0,
)


class SchedulerGauges:
    """The scheduler's gauges, read when Prometheus scrapes (all zero while no model is loaded)."""

    def __init__(self, stats: Callable[[], Stats | None]):
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self.stats()
        values = [
            ("inference_requests_running", "Rows decoding in the batch.", s.running if s else 0),
            ("inference_requests_waiting", "Requests waiting for cache slots.", s.waiting if s else 0),
            ("inference_requests_prefilling", "Requests whose prompt is being prefilled.", s.prefilling if s else 0),
            (
                "inference_kv_cache_slot_usage_ratio",
                "KV-cache slots in use / slots.",
                s.used_slots / s.slots if s else 0.0,
            ),
            (
                "inference_kv_cache_usage_ratio",
                "KV-cache positions holding tokens / positions.",
                s.cache_positions_used / s.cache_positions if s else 0.0,
            ),
        ]
        for name, doc, value in values:
            yield GaugeMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, stats: Callable[[], Stats | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "inference_time_to_first_token_seconds",
            "Request arrival to its first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "inference_inter_token_latency_seconds",
            "Time between two tokens of one sample.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "inference_e2e_request_latency_seconds",
            "Request arrival to its last token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("inference_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("inference_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("inference_requests", "Finished requests.", ["endpoint", "outcome"], registry=r)
        r.register(SchedulerGauges(stats))
