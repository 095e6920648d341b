"""The scaler: `celery-serve scaler`, started by `celery-serve run` and `serve.run()`.

Every `metrics_interval_s` it reads each autoscaled deployment's queue depth and in-flight count (see
`celery_serve.status`), asks the pure policy (`celery_serve.workers.autoscaling.decide`) how many replicas
to run, spreads that over the deployment's workers within each machine's cores and GPUs (`plan_resize`),
and resizes their pools with Celery's remote control (`pool_grow` / `pool_shrink`, to each worker by hostname). Every
change, and every change it starts waiting for, is logged at INFO with its inputs and reason.

It holds no state of its own: pool sizes come from the workers' registrations, the delay timers and the
last decision live in Redis. So a scaler that dies leaves the pools as they are (serving goes on), and
one started again picks up where it was, without duplicate or orphan replicas. One scaler acts at a time
(a lease in Redis); others started alongside stand by until the lease lapses.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery_serve._wire import keys as _keys
from celery_serve._wire import scripts as _scripts
from celery_serve._wire.connections import sync_client
from celery_serve.config import AutoscalingConfig, autoscaling_of
from celery_serve.status import HISTORY_LENGTH, RETIRED, DeploymentStatus, Snapshot, read_snapshot
from celery_serve.workers.autoscaling import AutoscalingContext, Decision, Machine, PoolInfo, decide, plan_resize, room

logger = logging.getLogger(__name__)

LEASE_S = 5.0
MAX_TICK_S = 1.0  # history samples (for status and throughput) are taken about once a second
_CONTROL_TIMEOUT_S = 3.0
_HOLD_AFTER_NO_REPLY_S = 5.0
_FOLD_EVERY_S = 30.0
_FOLD_AFTER_S = 60.0

Resize = Callable[[str, str, int], bool]  # (hostname, "grow"/"shrink", n) -> did the worker confirm


class Scaler:
    """One scaler; `run()` until `stop` is set, or `tick()` by hand (tests)."""

    def __init__(self, redis_url: str, resize: Resize | None = None, scaler_id: str | None = None) -> None:
        self.redis = sync_client(redis_url)
        self.id = scaler_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self._lead = self.redis.register_script(_scripts.LEAD)
        self._resign = self.redis.register_script(_scripts.RESIGN)
        self._resize = resize or CeleryResize(redis_url)
        self._due: dict[tuple[str, str], float] = {}
        self._sampled: dict[tuple[str, str], float] = {}
        self._hold: dict[tuple[str, str], float] = {}
        self._folded_at = 0.0
        self.leading = False

    def run(self, stop: threading.Event) -> None:
        logger.info("scaler %s started", self.id)
        try:
            while not stop.is_set():
                interval = MAX_TICK_S
                try:
                    interval = self.tick()
                except Exception:  # noqa: BLE001 - a bad tick (Redis away) must not end the scaler
                    logger.exception("scaler tick failed; retrying")
                stop.wait(interval)
        finally:
            try:
                self._resign(keys=[_keys.SCALER_LEADER], args=[self.id])
            except Exception:  # noqa: BLE001 - the lease lapses by itself
                pass
            logger.info("scaler %s stopped", self.id)

    def tick(self, now: float | None = None) -> float:
        """Decide and act once for every deployment that is due; returns the seconds until the next tick."""
        leading = bool(self._lead(keys=[_keys.SCALER_LEADER], args=[self.id, int(LEASE_S * 1000)]))
        if leading != self.leading:
            logger.info("scaler %s %s", self.id, "leads" if leading else "stands by (another scaler leads)")
            self.leading = leading
        if not leading:
            return MAX_TICK_S
        now = time.time() if now is None else now
        snapshot = read_snapshot(self.redis, now)
        machines = machines_of(snapshot)
        next_tick = MAX_TICK_S
        for status in snapshot.deployments:
            key = (status.app, status.deployment)
            self._sample(status, now)
            scaling = autoscaling_of({"autoscaling_config": status.autoscaling})
            if scaling is None:
                continue
            next_tick = min(next_tick, scaling.metrics_interval_s)
            if now < self._due.get(key, 0.0) or now < self._hold.get(key, 0.0):
                continue
            self._due[key] = now + scaling.metrics_interval_s
            machines = self.scale(status, scaling, machines, now)
        self._clean_up(snapshot, now)
        return next_tick

    def scale(
        self, status: DeploymentStatus, scaling: AutoscalingConfig, machines: dict[str, Machine], now: float
    ) -> dict[str, Machine]:
        """Decide for one deployment, resize its pools, record the decision; returns the machines' new use."""
        name = f"{status.app}.{status.deployment}"
        if not status.workers:
            self._record(status, None, now, reason="no worker is running for this deployment")
            return machines
        pools = [PoolInfo(w.hostname, w.machine, w.pool_size) for w in status.workers]
        fits = room(pools, machines, status.num_cpus, status.num_gpus)
        state = status.scaler_state
        ctx = AutoscalingContext(
            queued=status.queued,
            in_flight=status.in_flight,
            current_replicas=status.replicas,
            now_s=now,
            capacity_replicas=None if fits is None else status.replicas + fits,
            upscale_since_s=_float(state.get("upscale_since")),
            downscale_since_s=_float(state.get("downscale_since")),
        )
        decision = decide(ctx, scaling)
        if decision.changes(status.replicas):
            plan = plan_resize(pools, machines, decision.replicas, status.num_cpus, status.num_gpus)
            logger.info("%s: %d -> %d replicas: %s", name, status.replicas, decision.replicas, decision.reason)
            for pool in pools:
                if pool.hostname not in plan:
                    continue
                delta = plan[pool.hostname] - pool.pool_size
                if not self._resize(pool.hostname, "grow" if delta > 0 else "shrink", abs(delta)):
                    logger.warning(
                        "%s: worker %s did not confirm the resize; holding off for %.0fs",
                        name,
                        pool.hostname,
                        _HOLD_AFTER_NO_REPLY_S,
                    )
                    self._hold[(status.app, status.deployment)] = now + _HOLD_AFTER_NO_REPLY_S
                    continue
                machines[pool.machine] = machines[pool.machine].add(delta, status.num_cpus, status.num_gpus)
        else:
            starts_waiting = (decision.upscale_since_s is not None and "upscale_since" not in state) or (
                decision.downscale_since_s is not None and "downscale_since" not in state
            )
            level = logging.INFO if starts_waiting else logging.DEBUG
            logger.log(level, "%s: stays at %d replicas: %s", name, status.replicas, decision.reason)
        self._record(status, decision, now)
        return machines

    def _record(self, status: DeploymentStatus, decision: Decision | None, now: float, reason: str = "") -> None:
        key = _keys.autoscale_state(status.app, status.deployment)
        fields: dict[Any, Any] = {
            "at": now,
            "queued": status.queued,
            "in_flight": status.in_flight,
            "current": status.replicas,
            "scaler": self.id,
        }
        if decision is None:
            fields.update(reason=reason, desired=status.replicas, replicas=status.replicas)
            self.redis.hset(key, mapping=fields)
            return
        fields.update(desired=decision.desired, replicas=decision.replicas, reason=decision.reason)
        timers = {"upscale_since": decision.upscale_since_s, "downscale_since": decision.downscale_since_s}
        pipe = self.redis.pipeline()
        pipe.hset(key, mapping={**fields, **{k: v for k, v in timers.items() if v is not None}})
        gone = [k for k, v in timers.items() if v is None]
        if gone:
            pipe.hdel(key, *gone)
        pipe.execute()

    def _sample(self, status: DeploymentStatus, now: float) -> None:
        """Keep a short history per deployment: throughput for `status`, replica counts over time."""
        key = (status.app, status.deployment)
        if now - self._sampled.get(key, 0.0) < MAX_TICK_S:
            return
        self._sampled[key] = now
        sample = {
            "t": now,
            "requests": status.requests,
            "errors": status.errors,
            "queued": status.queued,
            "in_flight": status.in_flight,
            "replicas": status.replicas,
            "ready": status.ready,
        }
        name = _keys.history(status.app, status.deployment)
        pipe = self.redis.pipeline(transaction=False)
        pipe.lpush(name, json.dumps(sample))
        pipe.ltrim(name, 0, HISTORY_LENGTH - 1)
        pipe.expire(name, 24 * 3600)
        pipe.execute()

    def _clean_up(self, snapshot: Snapshot, now: float) -> None:
        """Forget workers that stopped heartbeating, and fold the counts of long-gone replicas into one
        field (so the stats hash does not grow with every replica an autoscaled deployment ever ran)."""
        if snapshot.stale_workers:
            self.redis.hdel(_keys.WORKERS, *snapshot.stale_workers)
        if now - self._folded_at < _FOLD_EVERY_S:
            return
        self._folded_at = now
        for status in snapshot.deployments:
            per_replica = snapshot.stats.get((status.app, status.deployment), {})
            live = set(status.replica_ids)
            gone = {
                rid: c
                for rid, c in per_replica.items()
                if rid != RETIRED and rid not in live and now - float(c.get("at", now)) > _FOLD_AFTER_S
            }
            if gone:
                fold_stats(
                    self.redis, _keys.replica_stats(status.app, status.deployment), per_replica.get(RETIRED), gone
                )


def fold_stats(client: Any, key: str, retired: dict[str, Any] | None, gone: dict[str, dict[str, Any]]) -> None:
    """Add the counts of `gone` replicas to the RETIRED field and drop theirs, in one transaction (a
    scrape in between would otherwise count them twice)."""
    total: dict[str, Any] = {"requests": 0, "batches": 0, "errors": 0, "batch_sizes": {}}
    for counts in [retired or {}, *gone.values()]:
        for name in ("requests", "batches", "errors"):
            total[name] += int(counts.get(name, 0))
        for size, n in (counts.get("batch_sizes") or {}).items():
            total["batch_sizes"][size] = total["batch_sizes"].get(size, 0) + int(n)
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, RETIRED, json.dumps(total))
    pipe.hdel(key, *gone)
    pipe.execute()


def machines_of(snapshot: Snapshot) -> dict[str, Machine]:
    """Each machine's capacity (the largest any of its workers reports; 0 means unknown: no limit) and what
    every live replica on it uses."""
    machines: dict[str, Machine] = {}
    for w in snapshot.workers:
        cpus = w.machine_cpus if w.machine_cpus > 0 else float("inf")
        m = machines.get(w.machine) or Machine(cpus=cpus, gpus=w.machine_gpus)
        m = Machine(max(m.cpus, cpus), max(m.gpus, w.machine_gpus), m.used_cpus, m.used_gpus)
        machines[w.machine] = m.add(w.pool_size, w.num_cpus, w.num_gpus)
    return machines


class CeleryResize:
    """Resizes a worker's pool with Celery's remote control, waiting for the worker's reply."""

    def __init__(self, redis_url: str) -> None:
        from celery_serve.workers.celery_app import make_celery

        self.control = make_celery(redis_url).control

    def __call__(self, hostname: str, how: str, n: int) -> bool:
        command = self.control.pool_grow if how == "grow" else self.control.pool_shrink
        replies = command(n, destination=[hostname], reply=True, timeout=_CONTROL_TIMEOUT_S)
        for reply in replies or []:
            answer = reply.get(hostname) or {}
            if "ok" in answer:
                return True
            logger.warning("worker %s refused pool_%s(%d): %s", hostname, how, n, answer)
        return False


def _float(value: str | None) -> float | None:
    return None if value in (None, "") else float(value)  # type: ignore[arg-type]


def run_scaler(redis_url: str, stop: threading.Event | None = None) -> None:
    """Run a scaler in the foreground until SIGTERM/SIGINT (or `stop`)."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    Scaler(redis_url).run(stop)
