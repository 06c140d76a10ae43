"""Prometheus metrics of the inference server (vLLM's set, under the `inference_` prefix).

Histograms: time to first token, inter-token latency, end-to-end request latency. Counters:
prompt and generated tokens, requests by endpoint and outcome. Gauges read at scrape time from
the served model's scheduler: running rows, waiting requests, KV-cache slot and position use.
Each app has its own registry, so several apps (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nanochat.scheduler import Stats

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75,
                   1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft = Histogram("inference_time_to_first_token_seconds", "Request arrival to its first token.",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("inference_inter_token_latency_seconds", "Time between two tokens of one sample.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("inference_e2e_request_latency_seconds", "Request arrival to its last token.",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("inference_prompt_tokens", "Prompt tokens prefilled.", registry=r)
        self.generation_tokens = Counter("inference_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter("inference_requests", "Finished requests.", ["endpoint", "outcome"], registry=r)
        self.running = Gauge("inference_requests_running", "Rows decoding in the batch.", registry=r)
        self.waiting = Gauge("inference_requests_waiting", "Requests waiting for cache slots.", registry=r)
        self.prefilling = Gauge("inference_requests_prefilling", "Requests whose prompt is being prefilled.", registry=r)
        self.slot_usage = Gauge("inference_kv_cache_slot_usage_ratio", "KV-cache slots in use / slots.", registry=r)
        self.cache_usage = Gauge("inference_kv_cache_usage_ratio", "KV-cache positions holding tokens / positions.",
                                 registry=r)

    def render(self, stats: Stats | None) -> bytes:
        if stats is not None:
            self.running.set(stats.running)
            self.waiting.set(stats.waiting)
            self.prefilling.set(stats.prefilling)
            self.slot_usage.set(stats.used_slots / stats.slots)
            self.cache_usage.set(stats.cache_positions_used / stats.cache_positions)
        return generate_latest(self.registry)
