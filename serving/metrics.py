"""Prometheus metrics of the server, on a registry of its own.

``dualdeploy_queue_depth`` and ``dualdeploy_inflight_requests`` are the gauges
the cloud HPA scales on (through the Prometheus adapter).
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.004,
    0.008,
    0.016,
    0.032,
    0.064,
    0.128,
    0.256,
    0.512,
    1.0,
    2.0,
    5.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Every metric the server exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        """Create the metrics on ``registry`` (a fresh one by default)."""
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dualdeploy_requests",
            "Requests answered, by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=r,
        )
        self.server_errors = Counter(
            "dualdeploy_server_errors",
            "Answers with a 5xx status (internal faults, overload, shutdown), by endpoint.",
            ["endpoint"],
            registry=r,
        )
        self.client_disconnects = Counter(
            "dualdeploy_client_disconnects",
            "Requests whose client hung up before the body was read (not a server error), by endpoint.",
            ["endpoint"],
            registry=r,
        )
        self.queue_seconds = Histogram(
            "dualdeploy_queue_seconds",
            "Time an inference request waited in the batch queue.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "dualdeploy_compute_seconds",
            "Time of one model run (one batch).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.request_seconds = Histogram(
            "dualdeploy_request_seconds",
            "Total time of an inference request in the server.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "dualdeploy_batch_size",
            "Rows in each model run.",
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "dualdeploy_queue_depth", "Inference requests waiting in the batch queue.", registry=r
        )
        self.inflight = Gauge(
            "dualdeploy_inflight_requests", "Inference requests being handled now.", registry=r
        )
        self.load_seconds = Gauge(
            "dualdeploy_model_load_seconds",
            "Seconds to verify, open and warm up the model.",
            registry=r,
        )
        self.startup_seconds = Gauge(
            "dualdeploy_startup_seconds", "Seconds from process start to ready.", registry=r
        )
        self.ready = Gauge("dualdeploy_ready", "1 while the server reports ready.", registry=r)
        self.info = Info("dualdeploy_model", "The served bundle and variant.", registry=r)
        self.int8_not_validated = Gauge(
            "dualdeploy_int8_not_validated",
            "1 when the bundle's INT8 variant was not validated at build for this CPU class "
            "(another variant serves, or INT8 was forced with --variant).",
            registry=r,
        )
        self.quality_gate = Gauge(
            "dualdeploy_quality_gate",
            "Figures of the on-device quality gate passed at start-up (agreement, max_abs_diff, ...).",
            ["figure"],
            registry=r,
        )

        # Edge -> cloud escalation (serving/cascade.py); zero while --escalate-to is not set.
        self.escalations = Counter(
            "dualdeploy_escalations",
            "Rows whose confidence was below the bundle's cascade threshold (sent to the cloud or not).",
            registry=r,
        )
        self.cloud_rows = Counter(
            "dualdeploy_escalation_cloud_rows", "Escalated rows the cloud teacher answered.", registry=r
        )
        self.fallbacks = Counter(
            "dualdeploy_escalation_fallbacks",
            "Escalations answered locally instead, by reason (deadline, unreachable, tls, http_error, "
            "wrong_model, bad_answer, circuit_open).",
            ["reason"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "dualdeploy_escalation_circuit_state",
            "The escalation circuit breaker: 0 closed, 1 half-open, 2 open.",
            registry=r,
        )
        self.cloud_seconds = Histogram(
            "dualdeploy_escalation_cloud_seconds",
            "Time of one escalation to the cloud (success or failure, within the deadline).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.fast_path = Counter(
            "dualdeploy_fast_path_requests",
            "Inference requests answered from the HTTP protocol without ASGI (serving.fastpath); the rest of "
            'dualdeploy_requests_total{endpoint="infer"} went through Starlette.',
            registry=r,
        )
        self.connections = Counter(
            "dualdeploy_connections",
            "TCP connections accepted by this server (a server that must see none can prove it).",
            registry=r,
        )

    def observe_batch(self, rows: int, seconds: float) -> None:
        """Record one model run: its rows and its compute time."""
        self.batch_size.observe(rows)
        self.compute_seconds.observe(seconds)

    def render(self) -> bytes:
        """The text exposition of every metric."""
        return generate_latest(self.registry)
