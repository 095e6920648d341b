"""kombu's Redis transport for Celery's own traffic on a Redis Cluster: it follows its slot through failovers.

On a cluster, Celery's traffic (control queues, remote-control replies, events) lives in the slot of the
`{serve-celery}` hash tag, on whichever node owns it (see `celery_app`). kombu has no cluster transport and
talks to one node, so this one differs from kombu's `redis` transport in two ways:
- every new connection goes to the node that owns the slot *now* (asked of the cluster), so after a
  failover the workers, the scaler and Flower reconnect to the promoted replica by themselves;
- the errors a cluster answers while it heals (`CLUSTERDOWN`, `TRYAGAIN`, `MOVED`, `ASK`, `MASTERDOWN`)
  are connection errors, on which Celery reconnects, instead of channel errors, on which a worker dies
  ("Unrecoverable error: ClusterDownError").

Selected by the broker URL's scheme, `serve-cluster://host:port/0` (registered with kombu on import).
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import redis as kombu_redis
from redis import exceptions as redis_errors

from celery_serve._wire.connections import REDIS_FAULTS, sync_client
from celery_serve._wire.urls import userinfo

logger = logging.getLogger(__name__)

SCHEME = "serve-cluster"
CELERY_SLOT_TAG = "{serve-celery}"
# transport option: the cluster's nodes ("host:port,host:port"), asked for the owner with the broker URL's
# credentials (so no secret sits in the transport options, which `celery inspect conf` shows)
CLUSTER_NODES_OPTION = "serve_cluster_nodes"

# What a cluster node answers while a slot has no reachable owner or is moving: try again elsewhere.
HEALING_ERRORS: tuple[type[BaseException], ...] = (
    redis_errors.ClusterDownError,
    redis_errors.TryAgainError,
    redis_errors.MovedError,
    redis_errors.AskError,
    redis_errors.MasterDownError,
    redis_errors.ReadOnlyError,
)


def slot_owner(cluster_url: str) -> tuple[str, int] | None:
    """The host and port of the node that owns Celery's slot now, or None when no node answers."""
    try:
        client = sync_client(cluster_url)
        try:
            node = client.get_node_from_key(CELERY_SLOT_TAG)  # type: ignore[attr-defined]
            return str(node.host), int(node.port)
        finally:
            client.close()
    except REDIS_FAULTS as exc:
        logger.warning("could not find the cluster node that owns Celery's slot: %r", exc)
        return None


class Channel(kombu_redis.Channel):
    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = super()._connparams(asynchronous)
        conninfo = self.connection.client
        nodes = conninfo.transport_options.get(CLUSTER_NODES_OPTION)
        owner = slot_owner(f"redis+cluster://{userinfo(conninfo.userid, conninfo.password)}{nodes}") if nodes else None
        if owner is not None:
            params["host"], params["port"] = owner
        return params


class Transport(kombu_redis.Transport):
    Channel = Channel
    connection_errors = kombu_redis.Transport.connection_errors + HEALING_ERRORS


TRANSPORT_ALIASES.setdefault(SCHEME, f"{__name__}:Transport")
