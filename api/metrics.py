"""Prometheus metrics on the gateway: `GET /metrics` (prometheus-client's text format).

Two kinds of series:
- The gateway's own, counted as requests pass: `serve_requests_total{application,deployment,status}` and
  `serve_request_latency_seconds{application,deployment}`. A request costs one counter increment and one
  histogram observation (label children are cached, so no label lookup on the hot path).
- The deployments' state, read from Redis when Prometheus scrapes (`app.status`): queue depth, requests in
  flight, replicas (current, desired, ready), what the replicas answered and their batch sizes. Every
  gateway reports these the same, so aggregate them with `max` across gateways, not `sum`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from app.status import Snapshot, aread_snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_LABELS = ["application", "deployment"]


class DeploymentCollector(Collector):
    """Yields the deployments' series from the snapshot taken just before `generate_latest`."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        snapshot = self.snapshot
        if snapshot is None:
            return
        gauges = {
            "queue_depth": GaugeMetricFamily("serve_queue_depth", "Requests waiting in the deployment's queue", labels=_LABELS),
            "in_flight": GaugeMetricFamily("serve_in_flight_requests", "Requests taken by a replica and not finished", labels=_LABELS),
            "replicas": GaugeMetricFamily("serve_replicas", "Replicas the deployment's worker pools run (including starting ones)", labels=_LABELS),
            "desired": GaugeMetricFamily("serve_replicas_desired", "Replicas the scaler (or num_replicas) asks for", labels=_LABELS),
            "ready": GaugeMetricFamily("serve_replicas_ready", "Replicas registered and heartbeating", labels=_LABELS),
            "workers": GaugeMetricFamily("serve_workers", "Live Celery workers of the deployment", labels=_LABELS),
        }
        requests = CounterMetricFamily("serve_replica_requests", "Requests the deployment's replicas answered", labels=_LABELS)
        errors = CounterMetricFamily("serve_replica_errors", "Requests the replicas answered with an error", labels=_LABELS)
        batches = HistogramMetricFamily("serve_batch_size", "Requests per call of the user's code", labels=_LABELS)
        for d in snapshot.deployments:
            labels = [d.app, d.deployment]
            for name, value in (
                ("queue_depth", d.queued),
                ("in_flight", d.in_flight),
                ("replicas", d.replicas),
                ("desired", d.desired),
                ("ready", d.ready),
                ("workers", len(d.workers)),
            ):
                gauges[name].add_metric(labels, value)
            requests.add_metric(labels, d.requests)
            errors.add_metric(labels, d.errors)
            batches.add_metric(labels, buckets=_cumulative(d.batch_sizes), sum_value=sum(k * v for k, v in d.batch_sizes.items()))
        yield from gauges.values()
        yield requests
        yield errors
        yield batches


def _cumulative(sizes: dict[int, int]) -> list[tuple[str, float]]:
    buckets: list[tuple[str, float]] = []
    for bound in BATCH_BUCKETS:
        buckets.append((floatToGoString(bound), float(sum(n for size, n in sizes.items() if size <= bound))))
    buckets.append(("+Inf", float(sum(sizes.values()))))
    return buckets


class GatewayMetrics:
    """The gateway's registry: its request counters plus the deployments' state at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "serve_requests", "HTTP requests the gateway answered", ["application", "deployment", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "serve_request_latency_seconds", "Time from request to response at the gateway", _LABELS, buckets=LATENCY_BUCKETS_S, registry=self.registry
        )
        self.deployments = DeploymentCollector()
        self.registry.register(self.deployments)
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, app: str, deployment: str, status: int, seconds: float) -> None:
        """Count one answered request: the hot path (two cached label children, no lookups)."""
        key = (app, deployment, status)
        children = self._children.get(key)
        if children is None:
            children = (self.requests.labels(app, deployment, str(status)), self.latency.labels(app, deployment))
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    async def render(self, redis: Any) -> bytes:
        """The text exposition, with the deployments' state read from Redis now."""
        self.deployments.snapshot = await aread_snapshot(redis)
        try:
            return generate_latest(self.registry)
        finally:
            self.deployments.snapshot = None
