"""Prometheus metrics of the inference server: vLLM's names under the `nanochat:` prefix.

Histograms: `time_to_first_token_seconds`, `inter_token_latency_seconds` (between two tokens of
one sample, from the model process's own step times), `e2e_request_latency_seconds`. Counters:
`prompt_tokens_total`, `generation_tokens_total`, and, read from the model process, the prefix
cache's `prefix_cache_queries_total` / `prefix_cache_hits_total` (prompt tokens looked up / found).
Gauges read at scrape time from the served model's scheduler: `num_requests_running` (rows
decoding), `num_requests_waiting`, `kv_cache_usage_perc` (0 to 1, as vLLM's: the share of the KV
pool's blocks that running or prefilling sequences hold; free blocks that still hold cached
prefixes do not count, as they can be taken at once). Requests by
endpoint and outcome are the service's own `inference_requests_total`; the pinned versions'
pool (`inference.pinned_pool`) is `inference_pinned_models` (loaded), `inference_pinned_loading`,
`inference_pinned_loads_total{outcome}` and `inference_pinned_evictions_total` (many evictions:
clients alternate between more versions than INFERENCE_MAX_PINNED holds). Each app has its own
registry, so several apps (tests) can live in one process; the service kit adds its HTTP
metrics to it and serves it at /metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from nanochat.scheduler import Stats
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from inference.pinned_pool import PinnedPool

PREFIX = "nanochat:"
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


class SchedulerMetrics:
    """What the scheduler counts, read when Prometheus scrapes (zero while no model is loaded).

    The prefix-cache counters start again at 0 when another model is loaded, which Prometheus's
    rate() reads as a counter reset."""

    def __init__(self, stats: Callable[[], Stats | None]):
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        gauges = [
            ("num_requests_running", "Rows decoding in the batch.", s.running if s else 0),
            ("num_requests_waiting", "Requests waiting for the cache.", s.waiting if s else 0),
            (
                "kv_cache_usage_perc",
                "KV-cache usage: 1 is all of it.",
                s.kv_blocks_used / s.kv_blocks if s else 0.0,
            ),
        ]
        for name, doc, value in gauges:
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        counters = [
            ("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_queries if s else 0),
            ("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_hits if s else 0),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(PREFIX + name, doc, value=value)


class PinnedMetrics:
    """The pinned versions' pool, read when Prometheus scrapes."""

    def __init__(self, pool: PinnedPool):
        self.pool = pool

    def collect(self) -> Iterator[Metric]:
        pool = self.pool
        yield GaugeMetricFamily("inference_pinned_models", "Pinned versions loaded.", value=len(pool.loaded()))
        yield GaugeMetricFamily("inference_pinned_loading", "Pinned versions loading.", value=pool.loading())
        loads = CounterMetricFamily("inference_pinned_loads", "Pinned version loads by outcome.", labels=["outcome"])
        for outcome, count in dict(pool.loads).items():
            loads.add_metric([outcome], count)
        yield loads
        yield CounterMetricFamily(
            "inference_pinned_evictions", "Idle pinned models stopped to make room.", value=pool.evictions
        )


class Metrics:
    def __init__(self, stats: Callable[[], Stats | None]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(PREFIX + name, doc, buckets=LATENCY_BUCKETS, registry=r)

        self.ttft = histogram("time_to_first_token_seconds", "Request arrival to its first token.")
        self.itl = histogram("inter_token_latency_seconds", "Time between two tokens of one sample.")
        self.e2e = histogram("e2e_request_latency_seconds", "Request arrival to its last token.")
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens of the requests.", registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("inference_requests", "Finished requests.", ["endpoint", "outcome"], registry=r)
        r.register(SchedulerMetrics(stats))
