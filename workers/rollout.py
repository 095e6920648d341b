"""Rolling updates of a pool's replicas, one at a time, as Ray Serve rolls a deployment.

When a deployment's identity changes (new code, new bind arguments, a changed `version` or an option that
needs a restart), each old replica is replaced in turn: a new replica is started and must be serving (it
registers only after its constructor and `reconfigure()` ran, so no request reaches a half-started replica)
before one old replica is told to stop, which it does gracefully (it finishes what it runs, or hands it
back). Requests keep flowing throughout: old and new replicas take from the same queue. A GPU deployment
replaces in place instead (stop one, then start one on its devices), as its devices are taken.
If a new replica fails to start, the rollout stops and the old replicas keep serving.
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from typing import Any

from celery_serve._wire import keys as _keys

logger = logging.getLogger(__name__)

NEW_REPLICA_TIMEOUT_S = 300.0


class Rollout(threading.Thread):
    """Replaces every replica of `pool` that predates `deployed_at`, one by one."""

    def __init__(self, pool: Any, deployed_at: float) -> None:
        super().__init__(name="celery-serve-rollout", daemon=True)
        self.pool = pool
        self.deployed_at = deployed_at
        self.cancelled = threading.Event()

    def run(self) -> None:
        name = self.pool.app.conf.serve_deployment
        with self.pool._lock:
            old = list(self.pool._slots)
        logger.warning("%s: rolling %d replicas over to the new version", name, len(old))
        for slot in old:
            if self.cancelled.is_set() or self.pool._stop.is_set():
                return
            if not self._replace(slot):
                logger.error("%s: rollout stopped; the remaining old replicas keep serving", name)
                return
        logger.warning("%s: rollout done", name)

    def _replace(self, old: Any) -> bool:
        pool = self.pool
        in_place = bool(pool.app.conf.serve_devices)
        with pool._lock:
            if old not in pool._slots:
                return True  # shrunk meanwhile
            if in_place:
                self._retire(old, keep_slot=True)
                new = old
            else:
                new = pool._new_slots(1)[0]
                pool._spawn(new)
                pool._slots.append(new)
                pool.limit = len(pool._slots)
        if in_place:
            self._wait_gone(old)
            with pool._lock:
                pool._spawn(new)
        if not self._wait_serving(new):
            if not in_place:
                with pool._lock:
                    if new in pool._slots:
                        self._retire(new, keep_slot=False)
                    pool.limit = len(pool._slots)
            return False
        if not in_place:
            with pool._lock:
                if old in pool._slots:
                    self._retire(old, keep_slot=False)
                pool.limit = len(pool._slots)
        pool._register()
        return True

    def _retire(self, slot: Any, keep_slot: bool) -> None:
        proc = slot.proc
        if not keep_slot:
            self.pool._slots.remove(slot)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            self.pool._retiring.append(proc)
        slot.proc = None
        slot.restart_at = float("inf") if keep_slot else 0.0  # the rollout starts it again

    def _wait_gone(self, slot: Any) -> None:
        for proc in list(self.pool._retiring):
            try:
                proc.wait(timeout=60)
            except Exception:  # noqa: BLE001 - the pool kills what does not stop on shutdown
                pass

    def _wait_serving(self, slot: Any) -> bool:
        """Until the new replica is registered, alive, and runs the new version."""
        deadline = time.monotonic() + NEW_REPLICA_TIMEOUT_S
        conf = self.pool.app.conf
        key = _keys.replicas(conf.serve_app, conf.serve_deployment)
        while time.monotonic() < deadline and not self.cancelled.is_set():
            proc = slot.proc
            if proc is None or proc.poll() is not None:
                logger.error("%s: a new replica exited while starting", conf.serve_deployment)
                return False
            try:
                raw = self.pool._redis.hget(key, slot.replica_id)
                if raw is not None and float(json.loads(raw).get("deployed_at") or 0) >= self.deployed_at:
                    return True
            except Exception as exc:  # noqa: BLE001 - Redis trouble: keep waiting until the deadline
                logger.debug("rollout could not read the replica's registration: %s", exc)
            time.sleep(0.05)
        return False
