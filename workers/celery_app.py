"""The Celery app every celery-serve process shares: JSON only, late acknowledgement, Redis everywhere.

Deployment requests are Celery task messages on per-deployment queues; replicas drain those queues
themselves (see `celery_serve.workers.consumer`), so this app mostly carries Celery's own machinery: worker identity,
heartbeats and remote control (Flower, `celery inspect`, `celery control pool_grow`), and it lets any
Celery client call a deployment with `send_task`.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from celery_serve._wire.connections import redacted
from celery_serve._wire.urls import RedisTarget, parse_redis_url, userinfo
from celery_serve.workers import cluster_broker
from celery_serve.workers.cluster_broker import CELERY_SLOT_TAG


def kombu_url(url: str) -> tuple[str, dict[str, Any]]:
    """The broker/backend URL and transport options kombu and Celery take for a celery-serve Redis URL.

    A Sentinel URL becomes kombu's `sentinel://...;sentinel://...` list with `master_name` (and the
    Sentinels' own password, if any) in the transport options."""
    target = parse_redis_url(url)
    if target.kind == "cluster":
        return _cluster_node_url(url, target)
    if target.kind == "single":
        if url.startswith("unix://"):  # kombu and Celery name a unix socket redis+socket://
            return "redis+socket://" + url[len("unix://") :], {}
        return url, {}
    auth = userinfo(target.username, target.password)
    nodes = ";".join(f"sentinel://{auth}{host}:{port}/{target.db}" for host, port in target.hosts)
    options: dict[str, Any] = {"master_name": target.master}
    if target.sentinel_password:
        options["sentinel_kwargs"] = {"password": target.sentinel_password}
    return nodes, options


# On a Redis Cluster, Celery's own traffic (worker control queues, remote control replies, kombu's
# bookkeeping) goes to the node that owns this hash tag's slot, every key prefixed with it: kombu has no
# cluster transport, and one slot keeps its multi-key commands legal. Pub/sub (events, broadcasts) reaches
# every node of a cluster anyway. Deployment requests never go through kombu (see `_wire.transport`).
# `cluster_broker` is kombu's redis transport finding that node anew on every connection (a failover moves it).


def _cluster_node_url(url: str, target: RedisTarget) -> tuple[str, dict[str, Any]]:
    """The broker URL of the cluster node that owns Celery's slot now, and the transport options that let
    kombu find its successor after a failover (and prefix every key with the slot's tag)."""
    owner = cluster_broker.slot_owner(url)
    if owner is None:
        host, port = target.hosts[0]  # nobody answered: a reconnect asks again
    else:
        host, port = owner
    auth = userinfo(target.username, target.password)
    nodes = ",".join(f"{node_host}:{node_port}" for node_host, node_port in target.hosts)
    options = {"global_keyprefix": CELERY_SLOT_TAG, cluster_broker.CLUSTER_NODES_OPTION: nodes}
    return f"{cluster_broker.SCHEME}://{auth}{host}:{port}/0", options


def make_celery(redis_url: str | None = None) -> Celery:
    url = redis_url or os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
    broker, sentinel_options = kombu_url(url)
    # On a cluster Celery's result backend would write `celery-task-meta-*` keys to one node, whatever their
    # slot: it is off. celery-serve stores results itself (`_wire.results`), each in its request's slot.
    backend = None if parse_redis_url(url).kind == "cluster" else broker
    celery = Celery("celery_serve", broker=broker, backend=backend, set_as_current=False)
    celery.conf.update(
        # Safe wire format: a message in any other content type is rejected, never unpickled.
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        # Acknowledge after the work is done, and requeue when the process running it dies.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One message at a time per process for Celery's own consumer: replicas do their own draining.
        worker_prefetch_multiplier=1,
        # Results live as long as celery-serve's job records (a day), not Celery's default.
        result_expires=int(os.environ.get("SERVE_RESULT_TTL_S", 24 * 3600)),
        # Messages that a dead consumer held come back after this long (kombu's own unacked restore);
        # replicas use their own faster heartbeat-based restore.
        broker_transport_options={"visibility_timeout": 3600, **sentinel_options},
        result_backend_transport_options={k: v for k, v in sentinel_options.items() if k != "global_keyprefix"},
        # Keep retrying the broker at start-up instead of exiting when Redis is a moment late.
        broker_connection_retry_on_startup=True,
        # Workers describe themselves in Flower by deployment; task events are sent by replicas.
        worker_send_task_events=True,
        worker_hijack_root_logger=False,
        timezone="UTC",
    )
    setattr(celery, _REDIS_URL_ATTR, url)  # not in `conf`: `celery inspect conf` and Flower show every setting
    celery.conf.serve_redis_display = redacted(url)
    return celery


_REDIS_URL_ATTR = "_serve_redis_url"


def redis_url_of(celery: Celery) -> str:
    """The Redis URL (password included) a Celery app from `make_celery` serves. Kept off `celery.conf`,
    which remote control (`celery inspect conf`) and Flower's worker page show to whoever can ask."""
    return str(getattr(celery, _REDIS_URL_ATTR))
