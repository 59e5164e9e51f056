"""Prometheus metrics of the API server: request counts, tokens, latencies, and the scheduler's gauges."""

from __future__ import annotations

from minisgl_jax.server.messages import SchedulerStats
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 60, 120)
TOKEN_GAP_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 5)


class ServerMetrics:
    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only double the output
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("minisgl_requests", "Finished requests (choices) by finish reason",
                                ["finish_reason"], registry=r)
        self.errors = Counter("minisgl_request_errors", "Requests answered with an error, by status",
                              ["status"], registry=r)
        self.prompt_tokens = Counter("minisgl_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("minisgl_generation_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter("minisgl_cached_prompt_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.ttft = Histogram("minisgl_time_to_first_token_seconds", "Time to first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.itl = Histogram("minisgl_inter_token_latency_seconds", "Time between output tokens", registry=r,
                             buckets=TOKEN_GAP_BUCKETS)
        self.e2e = Histogram("minisgl_e2e_request_latency_seconds", "Request latency, arrival to last token",
                             registry=r, buckets=LATENCY_BUCKETS)
        self.running = Gauge("minisgl_num_running_requests", "Requests in the running batch", registry=r)
        self.waiting = Gauge("minisgl_num_waiting_requests", "Requests queued for admission", registry=r)
        self.kv_usage = Gauge("minisgl_kv_cache_usage", "Fraction of KV pages not free", registry=r)
        self.kv_total = Gauge("minisgl_kv_pages_total", "Usable KV pages", registry=r)
        self.kv_free = Gauge("minisgl_kv_pages_free", "KV pages free", registry=r)
        self.kv_cached = Gauge("minisgl_kv_cached_pages", "KV pages held by the prefix cache", registry=r)
        self.cache_hit_rate = Gauge("minisgl_prefix_cache_hit_rate", "Cached prompt tokens / prompt tokens",
                                    registry=r)
        self.retractions = Gauge("minisgl_retractions", "Requests retracted for lack of KV pages, in all",
                                 registry=r)
        self.kv_invariant_ok = Gauge("minisgl_kv_invariant_ok", "1 while free + cached + held KV pages == all pages",
                                     registry=r)
        self.evicted_pages = Gauge("minisgl_evicted_pages", "Prefix cache pages evicted, in all", registry=r)

    def update(self, stats: SchedulerStats) -> None:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_usage.set(1 - stats.kv_pages_free / max(1, stats.kv_pages_total))
        self.kv_total.set(stats.kv_pages_total)
        self.kv_free.set(stats.kv_pages_free)
        self.kv_cached.set(stats.kv_pages_cached)
        self.cache_hit_rate.set(stats.cache_hit_tokens / max(1, stats.prompt_tokens))
        self.retractions.set(stats.num_retractions)
        self.evicted_pages.set(stats.num_evicted_pages)
        self.kv_invariant_ok.set(int(stats.kv_invariant_ok))

    def render(self) -> bytes:
        return generate_latest(self.registry)
