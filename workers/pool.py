"""`ReplicaPool`: a Celery worker pool whose processes are a deployment's replicas.

It plugs into Celery's worker as its pool (`pool_cls`), so the worker's concurrency is the replica count
and Celery's remote control resizes it (`celery control pool_grow/pool_shrink`, which the scaler uses).
Unlike Celery's prefork pool, the parent never hands tasks to children: each replica drains the
deployment's queue itself. The pool starts replicas, restarts those that die, and retires replicas
gracefully (SIGTERM: finish or hand back what they hold).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from celery.concurrency.base import BasePool

from celery_serve._runtime.launcher import spawn
from celery_serve._wire import keys as _keys
from celery_serve._wire import lifecycle
from celery_serve._wire.connections import REDIS_FAULTS, sync_client
from celery_serve._wire.delivery import DeploymentKeys, HandBack, epoch
from celery_serve.workers.celery_app import redis_url_of
from celery_serve.workers.freeze_watch import FreezeWatch, silence_limit_s
from celery_serve.workers.gpus import plan_placement, replica_env

logger = logging.getLogger(__name__)

_STOP_GRACE_S = 30.0
_MAX_BACKOFF_S = 30.0
REGISTER_EVERY_S = 2.0
WORKER_ALIVE_TTL_S = 10


def stop_grace_s(graceful_shutdown_timeout_s: float | None) -> float:
    """How long a stopping replica may take before it is killed: its `graceful_shutdown_timeout_s` to finish
    what it runs, plus time to hand back the rest and close its connections."""
    return _STOP_GRACE_S if graceful_shutdown_timeout_s is None else float(graceful_shutdown_timeout_s) + 10.0


@dataclass
class _Slot:
    proc: subprocess.Popen[bytes] | None = None
    replica_id: str = ""
    devices: list[str] = field(default_factory=list)
    failures: int = 0
    restart_at: float = 0.0
    given_up: bool = False  # the deployment is DEPLOY_FAILED: not restarted until it is deployed again
    frozen: bool = False  # killed for a frozen process (see freeze_watch): replaced at once, not backed off
    started_at: float = field(default_factory=time.monotonic)


class ReplicaPool(BasePool):
    """Celery pool of replica processes for one deployment (configured through `app.conf.serve_*`)."""

    signal_safe = False
    body_can_be_buffer = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._slots: list[_Slot] = []
        self._retiring: list[subprocess.Popen[bytes]] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._redis = sync_client(redis_url_of(self.app))
        self.redis_client = self._redis  # shared with the worker's remote-control commands
        conf = self.app.conf
        self._hand_back_of = HandBack(
            self._redis,
            DeploymentKeys(conf.serve_app, conf.serve_deployment, conf.serve_queue),
            int(conf.get("serve_max_deliveries") or 3),
        )
        self._registered_at = 0.0
        self._epoch: str | None = None
        self._deleted = False  # the application was deleted: replicas stopped until it is deployed again
        self._swept = True
        self._deployed_at = float(self.app.conf.get("serve_deployed_at") or 0.0)  # the version the pool runs
        self._identity = self.app.conf.get("serve_identity")
        self._rollout: Any = None
        self._last_seen: tuple[Any, Any] = (None, None)  # (spec, being deleted) as last read from Redis
        self._freezes = FreezeWatch(self._redis, conf.serve_app, conf.serve_deployment)

    def _command(self, replica_id: str) -> list[str]:
        conf = self.app.conf
        return [
            sys.executable,
            "-m",
            "celery_serve.workers.replica_main",
            "--app",
            conf.serve_app,
            "--deployment",
            conf.serve_deployment,
            "--replica-id",
            replica_id,
        ]

    def _spawn(self, slot: _Slot) -> None:
        conf = self.app.conf
        slot.replica_id = f"{conf.serve_deployment}@{conf.serve_hostname}-{uuid.uuid4().hex[:8]}"
        env = os.environ.copy()
        env.update(replica_env(slot.devices, conf.serve_cpu_fallback))
        env.update(conf.serve_replica_env)
        env["SERVE_WORKER_HOSTNAME"] = conf.get("serve_worker_hostname") or ""
        env["REDIS_URL"] = redis_url_of(self.app)  # in the environment, never in argv: it may hold a password
        slot.proc = spawn(self._command(slot.replica_id), env=env, start_new_session=True)
        slot.started_at = time.monotonic()
        logger.info("started replica pid %d of %s", slot.proc.pid, self.app.conf.serve_deployment)

    def _new_slots(self, n: int) -> list[_Slot]:
        """Slots for n more replicas, each with its GPU devices (none for a CPU deployment)."""
        conf = self.app.conf
        given = conf.serve_placement[len(self._slots) :] if conf.serve_placement else []
        used = self._devices_used_elsewhere() if conf.serve_devices else {}
        for slot in self._slots:
            for device in slot.devices:
                used[device] = used.get(device, 0.0) + min(conf.serve_num_gpus, 1.0)
        planned = given[:n]
        if len(planned) < n:
            planned += plan_placement(
                n - len(planned), conf.serve_num_gpus if conf.serve_devices else 0, conf.serve_devices, used
            )
        return [_Slot(devices=list(devices)) for devices in planned]

    def _devices_used_elsewhere(self) -> dict[str, float]:
        """GPU shares that other live workers on this machine hold (so fractional deployments that grow
        do not pile onto a device another deployment fills)."""
        conf = self.app.conf
        used: dict[str, float] = {}
        try:
            for raw in self._redis.hvals(_keys.WORKERS):
                info = json.loads(raw)
                host = info.get("hostname")
                if host == conf.get("serve_worker_hostname") or info.get("machine") != conf.get("serve_machine"):
                    continue
                if not self._redis.exists(_keys.worker_alive(host)):
                    continue
                share = min(float(info.get("num_gpus") or 0), 1.0)
                for devices in info.get("devices") or []:
                    for device in devices:
                        used[device] = used.get(device, 0.0) + share
        except Exception as exc:  # noqa: BLE001 - Redis trouble: place by this pool's own use only
            logger.warning("could not read other workers' GPU use: %s", exc)
        return used

    def _register(self) -> None:
        """Tell the scaler this worker exists: its hostname, pool size, machine and that machine's capacity."""
        conf = self.app.conf
        hostname = conf.get("serve_worker_hostname")
        if not hostname:
            return
        with self._lock:
            info = {
                "hostname": hostname,
                "app": conf.serve_app,
                "deployment": conf.serve_deployment,
                "pid": os.getpid(),
                "pool_size": len(self._slots),
                "num_cpus": conf.get("serve_num_cpus", 1.0),
                "num_gpus": conf.serve_num_gpus,
                "devices": [s.devices for s in self._slots],
                "machine": conf.get("serve_machine"),
                "machine_cpus": conf.get("serve_machine_cpus"),
                "machine_gpus": conf.get("serve_machine_gpus"),
                "at": time.time(),
            }
        try:
            pipe = self._redis.pipeline()  # MULTI: an entry never exists without its alive key
            pipe.hset(_keys.WORKERS, hostname, json.dumps(info))
            pipe.set(_keys.worker_alive(hostname), 1, ex=WORKER_ALIVE_TTL_S)
            pipe.execute()
            self._registered_at = time.monotonic()
            self._reannounce_after_data_loss()
        except Exception as exc:  # noqa: BLE001 - retried by the supervisor every few seconds
            logger.warning("could not register worker %s: %s", hostname, exc)

    def _reannounce_after_data_loss(self) -> None:
        """If Redis lost its data (its epoch changed), put this worker's application spec back, so the
        gateway routes to it again without a redeploy. An application deleted on purpose stays deleted (the
        epoch does not change for that)."""
        conf = self.app.conf
        current = epoch(self._redis)
        before, self._epoch = self._epoch, current
        if before is None or before == current or not conf.get("serve_spec_json"):
            return
        if self._redis.hsetnx(_keys.APPS, conf.serve_app, conf.serve_spec_json):
            self._redis.publish(_keys.APPS_CHANGED, conf.serve_app)
            logger.warning("Redis lost its data; re-announced application '%s'", conf.serve_app)

    def _unregister(self) -> None:
        hostname = self.app.conf.get("serve_worker_hostname")
        if not hostname:
            return
        try:
            self._redis.hdel(_keys.WORKERS, hostname)
            self._redis.delete(_keys.worker_alive(hostname))
        except Exception as exc:  # noqa: BLE001 - its alive key expires anyway
            logger.warning("could not unregister worker %s: %s", hostname, exc)

    def on_start(self) -> None:
        initial = self.app.conf.get("serve_initial_replicas")
        count = int(initial) if initial is not None else int(getattr(self, "limit", 1) or 1)
        with self._lock:
            count = self._within_node_limit(count)
            for slot in self._new_slots(count):
                self._spawn(slot)
                self._slots.append(slot)
            self.limit = len(self._slots)
        self._register()
        self._supervisor = threading.Thread(target=self._supervise, name="replica-supervisor", daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                for slot in self._slots:
                    self._check(slot)
                self._retiring = [p for p in self._retiring if p.poll() is None]
                self._replace_frozen()
            if time.monotonic() - self._registered_at >= REGISTER_EVERY_S:
                self._register()
            self._follow_spec()  # every tick: a rollout or a delete starts within half a second

    def _replace_frozen(self) -> None:
        """Kill replicas whose process froze (no heartbeat for a health check's period and timeout); `_check`
        then restarts them at once and hands back what they held."""
        conf = self.app.conf
        live = {s.replica_id: s for s in self._slots if s.proc is not None and s.proc.poll() is None}
        limit = silence_limit_s(conf.get("serve_health_check_period_s"), conf.get("serve_health_check_timeout_s"))
        for replica_id, silent in self._freezes.frozen(live, limit):
            slot = live[replica_id]
            assert slot.proc is not None
            slot.frozen = True
            self._freezes.replace(replica_id, slot.proc.pid, silent)

    def _follow_spec(self) -> None:
        """Follow the application's spec: roll the replicas over to a new version (new code or an option
        that needs a restart; lightweight changes the replicas take in place), stop them when the application
        (or this deployment) is deleted and, once they are gone, end what they handed back with a clear
        error; start them again if it is deployed again."""
        from celery_serve._runtime.apps import DELETING, fail_queued
        from celery_serve._runtime.spec import AppSpec
        from celery_serve.config import start_replicas

        conf = self.app.conf
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hget(_keys.APPS, conf.serve_app)
            pipe.hexists(DELETING, conf.serve_app)
            raw, deleting = pipe.execute()
            if (raw, deleting) == self._last_seen and self._swept:
                return  # nothing changed since the last tick, and nothing is pending
            self._last_seen = (raw, deleting)
            spec = AppSpec.from_json(raw) if raw is not None else None
            present = spec is not None and conf.serve_deployment in spec.deployments
            if spec is None and not deleting and not self._deleted:
                return  # gone without a delete: Redis lost its data, and the application is re-announced
            if not present and not self._deleted:
                logger.warning(
                    "application '%s' was deleted: stopping the replicas of %s", conf.serve_app, conf.serve_deployment
                )
                self._deleted, self._swept = True, False
                self.shrink(len(self._slots))
            elif not present and not self._swept:
                with self._lock:
                    stopping = any(p.poll() is None for p in self._retiring)
                if not stopping:
                    fail_queued(self._redis, conf.serve_app, [conf.serve_queue])
                    self._swept = True
            elif present and self._deleted and spec is not None:
                logger.warning("application '%s' was deployed again: starting its replicas", conf.serve_app)
                self._deleted = False
                self._follow_version(spec)
                self.grow(start_replicas(spec.deployments[conf.serve_deployment].config))
            elif present and spec is not None:
                self._follow_version(spec)
        except REDIS_FAULTS as exc:  # Redis is away: _register says so; checked again at the next tick
            logger.debug("could not read the spec of '%s': %r", conf.serve_app, exc)
        except Exception as exc:  # noqa: BLE001 - checked again at the next tick
            logger.warning("could not follow the spec of '%s': %s", conf.serve_app, exc)

    def _check(self, slot: _Slot) -> None:
        now = time.monotonic()
        if slot.given_up:
            if not self._deploy_failed():
                slot.given_up = False  # deployed again: try again
                slot.failures = 0
            return
        if slot.proc is not None and slot.proc.poll() is not None:
            code = slot.proc.returncode
            if code == lifecycle.EXIT_CONSTRUCTOR and self._deploy_failed():
                logger.error(
                    "replica pid %d of %s: its constructor failed max_constructor_retry_count times in a row; "
                    "not restarting it (DEPLOY_FAILED, see `celery-serve status`) until it is deployed again",
                    slot.proc.pid,
                    self.app.conf.serve_deployment,
                )
                slot.proc = None
                slot.given_up = True
                self._hand_back(slot.replica_id, code)
                return
            # replaced at once: a long run, a replica that failed its health checks, or one killed as frozen
            healthy_run = now - slot.started_at > 60 or code == lifecycle.EXIT_UNHEALTHY or slot.frozen
            slot.frozen = False
            slot.failures = 0 if healthy_run else slot.failures + 1
            delay = min(_MAX_BACKOFF_S, 0.5 * 2 ** max(slot.failures - 1, 0)) if slot.failures else 0.0
            logger.warning(
                "replica pid %d of %s exited with code %s; restarting in %.1fs",
                slot.proc.pid,
                self.app.conf.serve_deployment,
                code,
                delay,
            )
            slot.proc = None
            slot.restart_at = now + delay
            self._hand_back(slot.replica_id, code)
        if slot.proc is None and now >= slot.restart_at:
            self._spawn(slot)

    def _follow_version(self, spec: Any) -> None:
        from celery_serve.workers.rollout import Rollout

        if spec.deployed_at == self._deployed_at:
            return
        dep = spec.deployments[self.app.conf.serve_deployment]
        identity = dep.identity
        self._deployed_at = spec.deployed_at
        self.app.conf.serve_graceful_shutdown_timeout_s = dep.config.get("graceful_shutdown_timeout_s")
        self.app.conf.serve_health_check_period_s = dep.config.get("health_check_period_s")
        self.app.conf.serve_health_check_timeout_s = dep.config.get("health_check_timeout_s")
        if dep.config.get("autoscaling_config") is None:  # a fixed count: follow it (the scaler does the rest)
            wanted, have = int(dep.config["num_replicas"]), len(self._slots)
            if wanted > have:
                self.grow(wanted - have)
            elif wanted < have:
                self.shrink(have - wanted)
        if identity == self._identity:
            return  # the replicas take it in place (see celery_serve.workers.updates)
        started_with = self.app.conf.get("serve_worker_options")
        if started_with is not None and dep.worker_options() != started_with:
            # this worker's own options changed (resources): `run` starts a new worker and stops this one;
            # rolling here would start replicas with the old resources
            logger.warning(
                "%s: the new version changes options this worker was started with (%s); it keeps serving the "
                "old version until it is replaced (celery-serve run does that; restart a standalone worker)",
                self.app.conf.serve_deployment,
                ", ".join(k for k, v in dep.worker_options().items() if started_with.get(k) != v),
            )
            return
        self._identity = identity
        if self._rollout is not None:
            self._rollout.cancelled.set()
        self._rollout = Rollout(self, spec.deployed_at)
        self._rollout.start()

    def _deploy_failed(self) -> bool:
        conf = self.app.conf
        try:
            return bool(self._redis.exists(lifecycle.deploy_failed(conf.serve_app, conf.serve_deployment)))
        except Exception as exc:  # noqa: BLE001 - cannot tell: keep restarting with backoff
            logger.warning("could not read the deployment's state: %s", exc)
            return False

    def _hand_back(self, replica_id: str, code: int | None) -> None:
        """Put what a dead replica held back on the queue at once (no need to wait for its heartbeat), each
        counting a delivery; what reached max_deliveries is dead-lettered and its job failed."""
        try:
            restored, dead = self._hand_back_of(replica_id, force=True)
        except REDIS_FAULTS as exc:  # the deployment's reaper hands it back once the heartbeat runs out
            logger.warning("could not hand back requests of replica %s yet: %s", replica_id, exc)
            return
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        if restored:
            logger.warning(
                "put %d unfinished requests of dead replica %s (%s) back on the queue", restored, replica_id, how
            )
        if dead:
            logger.error(
                "gave up on %d requests of dead replica %s (%s): they killed replicas max_deliveries times and are "
                "in the dead-letter list (celery-serve dlq list %s)",
                dead,
                replica_id,
                how,
                self.app.conf.serve_app,
            )

    def grow(self, n: int = 1) -> None:
        """Start n more replicas (Celery's `pool_grow`, which the scaler sends)."""
        with self._lock:
            if self._stop.is_set():
                logger.warning("not growing %s: the worker is stopping", self.app.conf.serve_deployment)
                return
            n = self._within_node_limit(n)
            for slot in self._new_slots(n):
                self._spawn(slot)
                self._slots.append(slot)
            self.limit = len(self._slots)
        self._register()

    def _within_node_limit(self, n: int) -> int:
        """`max_replicas_per_node`: a worker runs on one machine, so its pool never exceeds the limit."""
        limit = self.app.conf.get("serve_max_replicas_per_node")
        if limit is None or len(self._slots) + n <= int(limit):
            return n
        allowed = max(0, int(limit) - len(self._slots))
        logger.warning(
            "%s: growing by %d would exceed max_replicas_per_node=%d on this machine; growing by %d",
            self.app.conf.serve_deployment,
            n,
            int(limit),
            allowed,
        )
        return allowed

    def shrink(self, n: int = 1) -> None:
        """Retire n replicas, newest first: each gets SIGTERM, finishes or hands back what it holds, exits."""
        with self._lock:
            n = min(n, len(self._slots))
            for _ in range(n):
                slot = self._slots.pop()
                if slot.proc is not None and slot.proc.poll() is None:
                    slot.proc.send_signal(signal.SIGTERM)
                    self._retiring.append(slot.proc)
            self.limit = len(self._slots)
        self._register()

    def on_stop(self) -> None:
        self._stop.set()
        if self._rollout is not None:
            self._rollout.cancelled.set()
        self._unregister()
        with self._lock:
            procs = [s.proc for s in self._slots if s.proc is not None] + self._retiring
            self._slots.clear()
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        grace = stop_grace_s(self.app.conf.get("serve_graceful_shutdown_timeout_s"))
        deadline = time.monotonic() + grace
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("replica pid %d did not stop in %.0fs; killing it", proc.pid, grace)
                proc.kill()
                proc.wait()

    def on_terminate(self) -> None:
        self.on_stop()

    def on_apply(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("ReplicaPool does not run Celery tasks: replicas consume their queue directly")

    def restart(self) -> None:
        with self._lock:
            for slot in self._slots:
                if slot.proc is not None and slot.proc.poll() is None:
                    slot.proc.send_signal(signal.SIGTERM)
                    self._retiring.append(slot.proc)
                    slot.proc = None
                    slot.restart_at = time.monotonic()

    @property
    def num_processes(self) -> int:
        return len(self._slots)

    def _get_info(self) -> dict[str, Any]:
        info = super()._get_info()
        with self._lock:
            pids = [s.proc.pid for s in self._slots if s.proc is not None and s.proc.poll() is None]
        info.update(
            {
                "max-concurrency": len(self._slots),
                "processes": pids,
                "deployment": self.app.conf.serve_deployment,
                "application": self.app.conf.serve_app,
                "devices": [s.devices for s in self._slots],
            }
        )
        return info
