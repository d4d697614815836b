"""Prometheus metrics of the server (prometheus_client, own registry)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("swiftkv_requests", "Finished requests by finish reason", ["reason"], registry=r)
        self.rejected = Counter("swiftkv_requests_rejected", "Requests refused because the queue was full", registry=r)
        self.prompt_tokens = Counter("swiftkv_prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("swiftkv_generation_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("swiftkv_time_to_first_token_seconds", "Time to first token", buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("swiftkv_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.running = Gauge("swiftkv_num_requests_running", "Requests being computed", registry=r)
        self.waiting = Gauge("swiftkv_num_requests_waiting", "Requests waiting", registry=r)
        self.kv_used = Gauge("swiftkv_kv_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_free = Gauge("swiftkv_kv_blocks_free", "KV-cache blocks free", registry=r)
        self.prefix_queries = Gauge("swiftkv_prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix "
                                    "cache (monotonic)", registry=r)
        self.prefix_hits = Gauge("swiftkv_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache "
                                 "(monotonic)", registry=r)
        self.prefix_hit_rate = Gauge("swiftkv_prefix_cache_hit_rate", "Hit tokens / queried tokens since start",
                                     registry=r)
        # speculative decoding (vLLM's spec_decode metrics; all 0 without --speculative-config)
        self.spec = {key: Gauge(f"swiftkv_{key}", doc, registry=r) for key, doc in (
            ("spec_decode_num_drafts", "Verification steps with draft tokens (monotonic)"),
            ("spec_decode_num_draft_tokens", "Draft tokens verified (monotonic)"),
            ("spec_decode_num_accepted_tokens", "Draft tokens accepted (monotonic)"),
            ("spec_decode_mean_acceptance_length", "Tokens per verification step since start: 1 + accepted / drafts"),
        )}

    def set_state(self, stats: dict) -> None:
        self.running.set(stats["running"])
        self.waiting.set(stats["waiting"])
        self.kv_used.set(stats["kv_blocks_used"])
        self.kv_free.set(stats["kv_blocks_free"])
        self.prefix_queries.set(stats["prefix_cache_queried_tokens"])
        self.prefix_hits.set(stats["prefix_cache_hit_tokens"])
        self.prefix_hit_rate.set(stats["prefix_cache_hit_rate"])
        for key, gauge in self.spec.items():
            gauge.set(stats[key])

    def render(self) -> bytes:
        return generate_latest(self.registry)
