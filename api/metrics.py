"""Prometheus metrics on the gateway: `GET /metrics` (prometheus-client's text format).

Two kinds of series:
- The gateway's own, counted as requests pass: `serve_requests_total{application,deployment,status}` and
  `serve_request_latency_seconds{application,deployment}`. A request costs a dict lookup, an increment
  and a bisect into the latency buckets (about a microsecond): the gateway is one asyncio thread, so its
  counts need none of prometheus-client's locks, and become metric families only when scraped.
- The deployments' state, read from Redis when Prometheus scrapes (`celery_serve.status`): queue depth, requests in
  flight, replicas (current, desired, ready), what the replicas answered and their batch sizes. Every
  gateway reports these the same, so aggregate them with `max` across gateways, not `sum`.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from celery_serve.status import Snapshot, aread_snapshot

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
            "queue_depth": GaugeMetricFamily(
                "serve_queue_depth", "Requests waiting in the deployment's queue", labels=_LABELS
            ),
            "in_flight": GaugeMetricFamily(
                "serve_in_flight_requests", "Requests taken by a replica and not finished", labels=_LABELS
            ),
            "replicas": GaugeMetricFamily(
                "serve_replicas", "Replicas the deployment's worker pools run (including starting ones)", labels=_LABELS
            ),
            "desired": GaugeMetricFamily(
                "serve_replicas_desired", "Replicas the scaler (or num_replicas) asks for", labels=_LABELS
            ),
            "ready": GaugeMetricFamily("serve_replicas_ready", "Replicas registered and heartbeating", labels=_LABELS),
            "workers": GaugeMetricFamily("serve_workers", "Live Celery workers of the deployment", labels=_LABELS),
            "dead_letters": GaugeMetricFamily(
                "serve_dead_letters",
                "Requests in the deployment's dead-letter list (given up on; see celery-serve dlq list)",
                labels=_LABELS,
            ),
        }
        requests = CounterMetricFamily(
            "serve_replica_requests", "Requests the deployment's replicas answered", labels=_LABELS
        )
        errors = CounterMetricFamily(
            "serve_replica_errors", "Requests the replicas answered with an error", labels=_LABELS
        )
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
                ("dead_letters", d.dead_letters),
            ):
                gauges[name].add_metric(labels, value)
            requests.add_metric(labels, d.requests)
            errors.add_metric(labels, d.errors)
            batches.add_metric(
                labels, buckets=_cumulative(d.batch_sizes), sum_value=sum(k * v for k, v in d.batch_sizes.items())
            )
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


class RequestCollector(Collector):
    """The gateway's request counts and latency histograms, kept in plain lists (one thread writes them)."""

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], int] = {}
        # (app, deployment) -> [count per bucket (the last one for +Inf), sum of seconds]
        self.latency: dict[tuple[str, str], list[Any]] = {}

    def observe(self, app: str, deployment: str, status: int, seconds: float) -> None:
        key = (app, deployment, status)
        self.counts[key] = self.counts.get(key, 0) + 1
        hist = self.latency.get((app, deployment))
        if hist is None:
            hist = self.latency[(app, deployment)] = [[0] * (len(LATENCY_BUCKETS_S) + 1), 0.0]
        hist[0][bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        hist[1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "serve_requests", "HTTP requests the gateway answered", labels=["application", "deployment", "status"]
        )
        for (app, deployment, status), n in sorted(self.counts.items()):
            requests.add_metric([app, deployment, str(status)], n)
        latency = HistogramMetricFamily(
            "serve_request_latency_seconds", "Time from request to response at the gateway", labels=_LABELS
        )
        for (app, deployment), (per_bucket, total) in sorted(self.latency.items()):
            cumulative, buckets = 0, []
            for bound, n in zip([*LATENCY_BUCKETS_S, float("inf")], per_bucket, strict=True):
                cumulative += n
                buckets.append((floatToGoString(bound), float(cumulative)))
            latency.add_metric([app, deployment], buckets=buckets, sum_value=total)
        yield requests
        yield latency


class GatewayMetrics:
    """The gateway's registry: its request counts plus the deployments' state at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = RequestCollector()
        self.deployments = DeploymentCollector()
        self.registry.register(self.requests)
        self.registry.register(self.deployments)
        self.observe = self.requests.observe  # the hot path: Gateway calls this once per request

    async def render(self, redis: Any) -> bytes:
        """The text exposition, with the deployments' state read from Redis now."""
        self.deployments.snapshot = await aread_snapshot(redis)
        try:
            return generate_latest(self.registry)
        finally:
            self.deployments.snapshot = None
