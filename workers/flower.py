"""Flower for a celery-serve deployment (`celery-serve flower`, which `celery-serve run` starts).

Flower is Celery's own monitor: it lists every deployment's worker (`<app>.<deployment>.<pid>@<host>`),
the queues they serve (their `active_queues` reply includes the deployment queue) and every request as a
task named `<app>.<deployment>.<method>`, from the task events replicas send (`celery_serve.workers.events`).
It binds to loopback unless told otherwise; set `FLOWER_BASIC_AUTH=user:password` (or `--flower-basic-auth`
on `run`) before exposing it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlparse

from celery_serve._wire.connections import async_client, is_cluster
from celery_serve.workers import cluster_broker
from celery_serve.workers.celery_app import make_celery


class ClusterQueues:
    """Flower's Broker tab (and `/api/queues/length`) on a Redis Cluster, where Flower knows no broker.

    A deployment's queue is read by its own name, in its own slot (replicas take from it directly, not through
    kombu); any other queue is Celery's own, under kombu's cluster key prefix. Answers as Flower's brokers do."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url

    async def queues(self, names: Iterable[str]) -> list[dict[str, Any]]:
        names = list(names)
        client = async_client(self.redis_url)
        try:
            lengths = [await client.llen(self.key(name)) for name in names]
        finally:
            await client.aclose()
        return [{"name": name, "messages": int(n)} for name, n in zip(names, lengths, strict=True)]

    @staticmethod
    def key(name: str) -> str:
        return name if name.startswith("serve.") else cluster_broker.CELERY_SLOT_TAG + name


def _with_cluster_queues(stock: Callable[..., Any], redis_url: str) -> Callable[..., Any]:
    """Flower's broker factory, answering for celery-serve's cluster scheme too (it raises for schemes it does
    not know, and its Broker tab answers 404 "'serve-cluster' broker is not supported")."""

    def broker(broker_url: str, *args: Any, **kwargs: Any) -> Any:
        if urlparse(broker_url).scheme == cluster_broker.SCHEME:
            return ClusterQueues(redis_url)
        return stock(broker_url, *args, **kwargs)

    return broker


def run_flower(redis_url: str, port: int, address: str, log_level: str, extra_args: list[str] | None = None) -> int:
    """Run Flower in the foreground until SIGTERM; returns its exit code.

    Flower reads its other options (FLOWER_BASIC_AUTH, FLOWER_URL_PREFIX, ...) from the environment.
    Tornado's --logging only sets the level: the process's logging is already set up (one format).
    """
    if is_cluster(redis_url):
        import flower.views  # where Flower's handlers find their broker (`BaseHandler.get_broker`)

        flower.views.Broker = _with_cluster_queues(flower.views.Broker, redis_url)  # type: ignore[attr-defined]
    celery = make_celery(redis_url)
    argv = ["--quiet", "flower", f"--port={port}", f"--address={address}", f"--logging={log_level.lower()}"]
    return int(celery.start([*argv, *(extra_args or [])]) or 0)
