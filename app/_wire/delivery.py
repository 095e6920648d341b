"""Handing a replica's unfinished work back to its deployment's queue, and giving up on what keeps failing.

Used by whoever learns that a replica is gone: its worker pool (the process exited), the deployment's reaper
(its heartbeat ran out), and the replica itself on shutdown. Every hand-back after a death counts a delivery in
the message; at the deployment's `max_deliveries` the request ends `failed` with `ReplicaCrashError` and is
kept in the dead-letter list instead of being run again.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import redis

from celery_serve._wire import keys as _keys
from celery_serve._wire import scripts as _scripts

CRASH_REASON = (
    "the replica died %d times running this request (it may crash its replica: a native crash, os._exit, "
    "the OOM killer, or a stall past the liveness timeout); it was not run again and is kept in the "
    "dead-letter list (celery-serve dlq list)"
)


@dataclass(frozen=True)
class DeploymentKeys:
    """The keys one deployment's delivery bookkeeping uses."""

    app: str
    deployment: str
    queue: str

    @property
    def heartbeats(self) -> str:
        return _keys.heartbeats(self.app, self.deployment)

    @property
    def replicas(self) -> str:
        return _keys.replicas(self.app, self.deployment)

    @property
    def dead_letters(self) -> str:
        return _keys.dead_letters(self.app, self.deployment)

    @property
    def reaper_lease(self) -> str:
        return _keys.reaper_lease(self.app, self.deployment)


def epoch(client: redis.Redis) -> str:
    """This Redis's data epoch (see `keys.EPOCH`), creating it if it is not there."""
    pipe = client.pipeline(transaction=False)
    pipe.set(_keys.EPOCH, uuid.uuid4().hex, nx=True)
    pipe.get(_keys.EPOCH)
    value = pipe.execute()[1]
    return value.decode() if isinstance(value, bytes) else str(value)


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


class HandBack:
    """RESTORE bound to one synchronous client."""

    def __init__(self, client: redis.Redis, keys: DeploymentKeys, max_deliveries: int) -> None:
        self.keys = keys
        self.max_deliveries = max_deliveries
        self._restore = client.register_script(_scripts.RESTORE)

    def __call__(self, replica_id: str, *, force: bool, count: bool = True) -> tuple[int, int]:
        """Hand back what `replica_id` held: (restored, dead-lettered); (-1, 0) when it is alive and not forced."""
        keys = [
            self.keys.queue,
            _keys.replica_claim(self.keys.app, self.keys.deployment, replica_id),
            _keys.replica_inflight(self.keys.app, self.keys.deployment, replica_id),
            self.keys.heartbeats,
            self.keys.replicas,
            self.keys.dead_letters,
        ]
        args = [
            replica_id,
            "1" if force else "0",
            self.max_deliveries,
            time.time(),
            now_iso(),
            CRASH_REASON,
            "1" if count else "0",
        ]
        restored, dead = self._restore(keys=keys, args=args)
        return int(restored), int(dead)
