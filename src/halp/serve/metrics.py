"""GET /metrics: the service's Prometheus metrics (prometheus_client), one registry per app.

Requests by endpoint and status, rows by decision, abstentions and the decode tokens they saved, the risk
distribution, batch sizes, queue depth, and latencies (request, prefill, decode). Under Ray Serve each replica
keeps its own registry (see docs/serving.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from halp.serve.engine import BatchStats, Job

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RISK_BUCKETS = tuple(round(0.05 * step, 2) for step in range(1, 21))
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter("halp_serve_requests", "HTTP requests answered, by endpoint and status.",
                                ["endpoint", "status"], registry=registry)  # fmt: skip
        self.request_seconds = Histogram("halp_serve_request_seconds", "Seconds from a request to its full answer.",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip
        self.rows = Counter("halp_serve_rows", "Rows scored, by decision (answered, flagged, abstained, scored for "
                            "/v1/risk items, failed).", ["decision"], registry=registry)  # fmt: skip
        self.abstentions = Counter("halp_serve_abstentions", "Chat requests abstained (risk at or above the "
                                   "threshold under --policy abstain).", registry=registry)  # fmt: skip
        self.decode_tokens_saved = Counter("halp_serve_decode_tokens_saved", "Decode tokens not generated because "
                                           "their request abstained (its max_tokens).", registry=registry)  # fmt: skip
        self.completion_tokens = Counter("halp_serve_completion_tokens", "Tokens decoded for answers.",
                                         registry=registry)  # fmt: skip
        self.prompt_tokens = Counter("halp_serve_prompt_tokens", "Prompt tokens prefilled.", registry=registry)
        self.risk = Histogram("halp_serve_risk", "The probe's risk of the rows scored.", buckets=RISK_BUCKETS,
                              registry=registry)  # fmt: skip
        self.batch_size = Histogram("halp_serve_batch_size", "Rows per prefill pass.", buckets=BATCH_BUCKETS,
                                    registry=registry)  # fmt: skip
        self.queue_depth = Gauge("halp_serve_queue_depth", "Rows waiting for a batch.", registry=registry)
        self.batch_seconds = Histogram("halp_serve_batch_seconds", "Seconds per batch in the engine.",
                                       buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip
        self.prefill_seconds = Histogram("halp_serve_prefill_seconds", "Seconds per prefill pass (hooks and risk "
                                         "included).", buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip
        self.decode_seconds = Histogram("halp_serve_decode_seconds", "Seconds per decoding pass after the prefill.",
                                        buckets=LATENCY_BUCKETS, registry=registry)  # fmt: skip

    def batch_done(self, jobs: Sequence[Job], stats: Sequence[BatchStats], seconds: float) -> None:
        self.batch_seconds.observe(seconds)
        for item in stats:
            self.batch_size.observe(item.rows)
            self.prefill_seconds.observe(item.prefill_seconds)
            if item.decoded_rows:
                self.decode_seconds.observe(item.decode_seconds)
        for job in jobs:
            outcome = job.outcome
            if job.error is not None or outcome is None:
                self.rows.labels("failed").inc()
                continue
            self.rows.labels(outcome.decision).inc()
            self.risk.observe(outcome.risk)
            self.prompt_tokens.inc(outcome.prompt_tokens)
            self.completion_tokens.inc(outcome.completion_tokens)
            if outcome.decision == "abstained":
                self.abstentions.inc()
                self.decode_tokens_saved.inc(outcome.decode_tokens_saved)

    def request_done(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.request_seconds.labels(endpoint).observe(seconds)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def value(self, name: str, labels: dict[str, Any] | None = None) -> float | None:
        """A sample's current value (tests, /healthz)."""
        return self.registry.get_sample_value(name, labels or {})
