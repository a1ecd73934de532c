"""Prometheus metrics of one server (its own registry: no process-global state)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("planc_requests", "Requests by variant and HTTP status.", ["variant", "status"],
                                registry=r)
        self.prompt_tokens = Counter("planc_prompt_tokens", "Prompt tokens processed.", ["variant"], registry=r)
        self.generation_tokens = Counter("planc_generation_tokens", "Tokens generated.", ["variant"], registry=r)
        self.ttft = Histogram("planc_time_to_first_token_seconds", "Time to first token.", ["variant"],
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("planc_time_per_output_token_seconds", "Time per output token after the first.",
                              ["variant"], buckets=_LATENCY_BUCKETS, registry=r)
        self.block_batch = Histogram("planc_block_batch_size", "Sequences per batched block call.", ["block"],
                                     buckets=_BATCH_BUCKETS, registry=r)
        self.block_batch_variants = Histogram("planc_block_batch_variants",
                                              "Distinct variants per batched block call.", ["block"],
                                              buckets=_BATCH_BUCKETS, registry=r)
        self.mixed_batches = Counter("planc_block_mixed_batches", "Batched block calls that mixed variants.",
                                     ["block"], registry=r)
        self.kv_usage = Gauge("planc_kv_cache_usage_ratio", "Fraction of KV pages in use.", registry=r)
        self.preemptions = Gauge("planc_preemptions", "Sequences preempted so far (KV full).", registry=r)
        self.waiting = Gauge("planc_requests_waiting", "Requests waiting for admission.", registry=r)
        self.running = Gauge("planc_requests_running", "Sequences in the running batch.", registry=r)

    def on_batch(self, block: str, size: int, num_variants: int) -> None:
        self.block_batch.labels(block).observe(size)
        self.block_batch_variants.labels(block).observe(num_variants)
        if num_variants > 1:
            self.mixed_batches.labels(block).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
