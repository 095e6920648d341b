"""Replacing replicas whose whole process froze: the pool's side of health checking.

A replica's health-check thread (`celery_serve.workers.health`) cannot see its own process freeze: a SIGSTOP, a
VM pause, or a call that holds the GIL stops the checker with everything else. Its heartbeat stops too, and the
deployment's reaper hands its work back (`celery_serve.workers.replica_redis.Liveness`), but the process would
stay, holding its pool slot for ever. The pool, a process of its own, reads its replicas' heartbeats instead:
one that has beaten before and has been silent for longer than a health check may take
(`health_check_period_s + health_check_timeout_s`, 40 s by Ray's defaults, at least `ALIVE_TTL_S`) is frozen,
and is killed, so that the pool replaces it at once, as Ray replaces a replica that fails its health checks.
A shorter stall (a GC pause) is survived: the replica rejoins by itself at its next heartbeat. The deployment
reads UNHEALTHY until a replacement passes its checks.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable
from typing import Any

from celery_serve._wire import keys as _keys
from celery_serve._wire import lifecycle
from celery_serve._wire.connections import REDIS_FAULTS
from celery_serve.workers.replica_redis import ALIVE_TTL_S

logger = logging.getLogger(__name__)

CHECK_EVERY_S = 2.0


def silence_limit_s(period_s: float | None, timeout_s: float | None) -> float:
    """How long a replica may go without a heartbeat before it counts as frozen: a health check's period and
    timeout (Ray's defaults: 10 + 30 s), and never less than the heartbeat's own lifetime (`ALIVE_TTL_S`), as
    heartbeats come every few seconds whatever the health-check options say."""
    checks = (10.0 if period_s is None else float(period_s)) + (30.0 if timeout_s is None else float(timeout_s))
    return max(checks, float(ALIVE_TTL_S))


class FreezeWatch:
    """Remembers each replica's last heartbeat (on Redis's clock) and names those silent past the limit."""

    def __init__(self, redis: Any, app: str, deployment: str) -> None:
        self.redis = redis
        self.app = app
        self.deployment = deployment
        self.key = _keys.heartbeats(app, deployment)
        self._last_beat: dict[str, float] = {}  # replica id -> when it last beat (Redis clock, epoch s)
        self._first_beat: dict[str, float] = {}  # replica id -> when it was first seen beating
        self._marked: tuple[str, float] | None = None  # (the frozen replica, when) of our UNHEALTHY mark
        self._next_check = 0.0
        self._redis_now = 0.0

    def frozen(self, replica_ids: Iterable[str], limit_s: float) -> list[tuple[str, float]]:
        """(replica id, seconds silent) of the given live replicas that froze; [] between checks, and whenever
        Redis cannot be read (the pool never judges a replica by its own blindness)."""
        now = time.monotonic()
        if now < self._next_check:
            return []
        self._next_check = now + CHECK_EVERY_S
        ids = list(replica_ids)
        if not ids:
            return []
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.time()
            pipe.zrange(self.key, 0, -1, withscores=True)  # every replica's heartbeat in one read
            seconds, beats = pipe.execute()
        except REDIS_FAULTS as exc:
            logger.debug("cannot read heartbeats now: %r", exc)
            return []
        redis_now = self._redis_now = float(seconds[0]) + float(seconds[1]) / 1e6
        alive_until = {(rid.decode() if isinstance(rid, bytes) else str(rid)): float(score) for rid, score in beats}
        found = []
        for replica_id, score in ((rid, alive_until.get(rid)) for rid in ids):
            if score is not None:  # a score is the time until which it is known alive: it beat ALIVE_TTL_S before
                beat = score - ALIVE_TTL_S
                self._last_beat[replica_id] = max(self._last_beat.get(replica_id, 0.0), beat)
                self._first_beat.setdefault(replica_id, beat)
            last = self._last_beat.get(replica_id)
            if last is None:
                continue  # has not beaten yet: still starting (a constructor may load a model for minutes)
            if redis_now - last > limit_s:
                found.append((replica_id, redis_now - last))
        self._last_beat = {rid: t for rid, t in self._last_beat.items() if rid in ids}
        self._first_beat = {rid: t for rid, t in self._first_beat.items() if rid in ids}
        if self._marked is not None and not found and any(t > self._marked[1] for t in self._first_beat.values()):
            self._clear_mark()  # a replica started since serves: the deployment is healthy again
        return found

    def _clear_mark(self) -> None:
        assert self._marked is not None
        key = lifecycle.unhealthy(self.app, self.deployment)
        try:
            mark = lifecycle.read(self.redis.get(key))
            if mark is not None and mark.get("replica") == self._marked[0]:  # ours, not a failed check's
                self.redis.delete(key)
            self._marked = None
        except REDIS_FAULTS as exc:
            logger.debug("could not clear the unhealthy mark yet: %r", exc)

    def replace(self, replica_id: str, pid: int, silent_s: float) -> None:
        """Mark the deployment UNHEALTHY (cleared by a replacement's first passing check) and kill the process;
        the pool sees it exit, hands back what it held and starts another at once."""
        message = (
            f"replica {replica_id} (pid {pid}) sent no heartbeat for {silent_s:.0f} s while its process lives: "
            "frozen (SIGSTOP, a VM pause, or a call holding the GIL); replaced"
        )
        logger.error("%s", message)
        try:
            lifecycle.mark_unhealthy(self.redis, self.app, self.deployment, message, replica_id)
            self._marked = (replica_id, self._redis_now)
        except REDIS_FAULTS as exc:
            logger.warning("could not mark %s.%s unhealthy: %r", self.app, self.deployment, exc)
        try:
            os.kill(pid, signal.SIGKILL)  # a stopped process takes SIGKILL too; SIGTERM would wait for SIGCONT
        except ProcessLookupError:
            pass
