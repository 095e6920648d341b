"""The scaler against real parts: Redis, Celery workers with replica pools, the scaler process.

Each test deploys its own application into the session (`app.run(name=...)`) on a machine of its own
(`SERVE_MACHINE_ID`, `SERVE_MACHINE_CPUS`), so the session's other applications do not use up the
capacity the scaler may place replicas in. Every request records its execution in Redis; the tests
check that each ran exactly once while replicas came and went.
"""

from __future__ import annotations

import signal
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psutil
import pytest
import redis

from celery_serve import DeploymentHandle, run
from celery_serve._runtime import serve as _serve
from celery_serve._runtime.launcher import redis_env, scaler_command
from celery_serve._wire import keys as _keys
from celery_serve.status import DeploymentStatus, read_snapshot
from celery_serve.workers.celery_app import make_celery
from tests import scaling_deployments as sd
from tests.conftest import Served, wait_until

pytestmark = pytest.mark.timeout(180)


def replica_processes(app_name: str) -> list[psutil.Process]:
    """The live replica processes of an application on this machine (orphans included)."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if proc.info["status"] == psutil.STATUS_ZOMBIE or "celery_serve.workers.replica_main" not in cmdline:
            continue
        if "--app" in cmdline and cmdline[cmdline.index("--app") + 1] == app_name:
            found.append(proc)
    return found


class Deployed:
    """One test application: its handle, its status, and its recorded executions."""

    def __init__(self, served: Served, name: str, deployment: str, handle: DeploymentHandle) -> None:
        self.name, self.deployment, self.handle = name, deployment, handle
        self.redis = redis.Redis.from_url(served.redis_url)
        self.tag = f"{name}-{uuid.uuid4().hex[:6]}"

    def status(self) -> DeploymentStatus:
        found = read_snapshot(self.redis).find(self.name, self.deployment)
        assert found is not None, f"{self.name}.{self.deployment} is not deployed"
        return found

    def call(self, key: str, timeout_s: float = 90) -> Any:
        return self.handle.remote(self.tag, key).result(timeout_s=timeout_s)

    def runs(self) -> dict[str, int]:
        return {k.decode(): int(v) for k, v in self.redis.hgetall(sd.runs_key(self.tag)).items()}

    def assert_each_ran_once(self, keys: set[str]) -> None:
        runs = self.runs()
        assert set(runs) == keys
        repeated = {k: n for k, n in runs.items() if n != 1}
        assert not repeated, f"requests that ran more than once: {repeated}"


@pytest.fixture
def deploy(served: Served, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Deployed]]:
    names: list[str] = []

    def start(application: Any, deployment: str, machine_cpus: float = 1.0) -> Deployed:
        name = f"scale-{deployment.lower()}-{uuid.uuid4().hex[:4]}"
        monkeypatch.setenv("SERVE_MACHINE_ID", f"machine-{name}")  # a machine of its own, with this capacity
        monkeypatch.setenv("SERVE_MACHINE_CPUS", str(machine_cpus))
        names.append(name)
        handle = run(application, name=name, route_prefix=f"/{name}", redis_url=served.redis_url, startup_timeout_s=150)
        return Deployed(served, name, deployment, handle)

    yield start
    for name in names:
        _serve.delete(name)


class Watcher(threading.Thread):
    """Samples a deployment's replica count while a test runs (the largest and the latest)."""

    def __init__(self, deployed: Deployed) -> None:
        super().__init__(daemon=True)
        self.deployed = deployed
        self.most = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.05):
            self.most = max(self.most, self.deployed.status().replicas)


def test_step_load_scales_to_max_and_back_to_min_running_each_request_once(deploy: Callable[..., Deployed]) -> None:
    step = deploy(sd.step_app, "Step")
    assert step.status().replicas == 1
    watcher = Watcher(step)
    watcher.start()
    keys = {str(i) for i in range(300)}
    responses = [step.handle.remote(step.tag, key) for key in sorted(keys)]
    wait_until(lambda: step.status().replicas == 4, timeout_s=60, what="four replicas under load")
    results = [r.result(timeout_s=120) for r in responses]
    assert {r["key"] for r in results} == keys
    assert len({r["pid"] for r in results}) >= 2  # the work spread over the new replicas
    step.assert_each_ran_once(keys)
    wait_until(lambda: step.status().replicas == 1, timeout_s=60, what="back to one replica")
    wait_until(lambda: len(replica_processes(step.name)) == 1, timeout_s=30, what="retired replicas to exit")
    watcher.stop.set()
    assert watcher.most == 4
    status = step.status()
    assert "downscale_delay_s=3" in (status.decision or "") or "steady" in (status.decision or "")
    step.assert_each_ran_once(keys)  # nothing ran again while replicas were retired


def test_scales_from_zero_and_back_to_zero(deploy: Callable[..., Deployed]) -> None:
    idle = deploy(sd.from_zero_app, "FromZero")
    status = idle.status()
    assert (status.replicas, status.ready, len(status.workers)) == (0, 0, 1)
    assert replica_processes(idle.name) == []
    assert idle.call("first", timeout_s=60)["key"] == "first"  # waited in the queue for the first replica
    idle.assert_each_ran_once({"first"})
    wait_until(lambda: idle.status().replicas == 0, timeout_s=30, what="scale back to zero")
    wait_until(lambda: replica_processes(idle.name) == [], timeout_s=30, what="the replica to exit")
    assert idle.call("second", timeout_s=60)["key"] == "second"
    idle.assert_each_ran_once({"first", "second"})


def test_growth_stops_at_the_machine_capacity(deploy: Callable[..., Deployed]) -> None:
    capped = deploy(sd.restartable_app, "Restartable", machine_cpus=0.5)  # fits two replicas of 0.25 cpus
    watcher = Watcher(capped)
    watcher.start()
    keys = {f"c{i}" for i in range(60)}
    responses = [capped.handle.remote(capped.tag, key) for key in sorted(keys)]
    wait_until(lambda: "fit only 2" in (capped.status().decision or ""), timeout_s=60, what="the capacity limit")
    [r.result(timeout_s=120) for r in responses]
    watcher.stop.set()
    assert watcher.most == 2  # max_replicas is 3, but two fill the machine
    capped.assert_each_ran_once(keys)


def test_a_killed_scaler_leaves_serving_alone_and_a_new_one_converges(
    served: Served, deploy: Callable[..., Deployed]
) -> None:
    session = _serve._session
    assert session is not None
    restart = deploy(sd.restartable_app, "Restartable")
    for proc in [p for p in session.group.processes if p.name == "scaler"]:
        proc.proc.send_signal(signal.SIGKILL)
        proc.proc.wait()
        session.group.processes.remove(proc)

    sent: list[str] = []
    stop = threading.Event()

    def load(worker: int) -> None:
        n = 0
        while not stop.is_set():
            key = f"w{worker}-{n}"
            sent.append(key)
            restart.call(key)
            n += 1

    with ThreadPoolExecutor(6) as pool:
        loaders = [pool.submit(load, i) for i in range(6)]
        wait_until(lambda: len(restart.runs()) >= 40, timeout_s=60, what="requests served without a scaler")
        assert restart.status().replicas == 1  # no scaler: the pool stays as it was, and serving goes on
        watcher = Watcher(restart)
        watcher.start()
        session.group.start("scaler", scaler_command(), env=redis_env(served.redis_url))
        wait_until(lambda: restart.status().replicas == 3, timeout_s=60, what="the new scaler to grow the pool")
        stop.set()
        for loader in loaders:
            loader.result(timeout=120)
    wait_until(lambda: restart.status().replicas == 1, timeout_s=60, what="the new scaler to shrink the pool")
    wait_until(lambda: len(replica_processes(restart.name)) == 1, timeout_s=30, what="no orphan replicas")
    watcher.stop.set()
    assert watcher.most == 3
    status = restart.status()
    assert status.ready == 1 and len(status.workers) == 1
    restart.assert_each_ran_once(set(sent))


def test_retired_replicas_finish_what_they_hold(served: Served, deploy: Callable[..., Deployed]) -> None:
    held = deploy(sd.held_app, "Held")
    keys = {f"h{i}" for i in range(120)}
    responses = [held.handle.remote(held.tag, key) for key in sorted(keys)]

    def every_replica_holds_work() -> list[str]:
        status = held.status()
        holding = [
            rid
            for rid in status.replica_ids
            if held.redis.hlen(_keys.replica_inflight(held.name, held.deployment, rid))
        ]
        return status.replica_ids if len(holding) == 3 else []

    wait_until(every_replica_holds_work, timeout_s=30, interval_s=0.01, what="all three replicas to hold requests")
    hostname = held.status().workers[0].hostname
    replies = make_celery(served.redis_url).control.pool_shrink(2, destination=[hostname], reply=True, timeout=10)
    assert replies and "ok" in replies[0][hostname]
    results = [r.result(timeout_s=90) for r in responses]
    assert {r["key"] for r in results} == keys
    held.assert_each_ran_once(keys)  # what the two retired replicas held was finished, not lost or run again
    wait_until(lambda: len(replica_processes(held.name)) == 1, timeout_s=30, what="the retired replicas to exit")
    assert held.status().replicas == 1


def test_run_restarts_a_dead_scaler_and_serves_on_without_flower(redis_url: str) -> None:
    """What `celery-serve run` does when one of its optional processes exits."""
    from celery_serve._runtime.launcher import ProcessGroup

    group = ProcessGroup()
    session = _serve._Session(redis_url, group, flower_url="http://127.0.0.1:5555")
    try:
        for name in ("scaler", "flower", "gateway"):
            group.start(name, [sys.executable, "-c", "pass"]).proc.wait()
        dead = _serve.essential_dead(session)
        assert [p.name for p in dead] == ["gateway"]  # only what serving needs counts as a failure
        assert session.flower_url is None and "flower" not in [p.name for p in group.processes]
        scaler = next(p for p in group.processes if p.name == "scaler")
        assert scaler.proc.poll() is None  # started again
        assert scaler.proc.args == scaler_command()
    finally:
        group.stop()


def test_the_status_read_costs_no_heartbeat_command_per_replica(redis_url: str, redis_client: redis.Redis) -> None:
    """The scaler reads every deployment's status each second, and `/metrics` on every scrape: its replicas'
    heartbeats come in one read per deployment (not one per replica), and still tell the live ones."""
    from celery_serve import deployment
    from celery_serve._runtime.spec import build_spec

    @deployment(num_replicas=5)
    class Counted:
        """Only its spec is used."""

    name = f"status-{uuid.uuid4().hex[:8]}"
    spec = build_spec(Counted.bind(), name, None)
    beats, replicas = _keys.heartbeats(name, "Counted"), _keys.replicas(name, "Counted")
    now = float(redis_client.time()[0])
    ids = [f"r{i}" for i in range(5)]
    redis_client.hset(_keys.APPS, name, spec.to_json())
    for i, rid in enumerate(ids):
        redis_client.hset(replicas, rid, "{}")
        redis_client.zadd(beats, {rid: now + (30 if i < 3 else -30)})  # three alive, two whose heartbeat ran out
    sent: list[str] = []

    class Counting:
        def __init__(self, pipe: Any) -> None:
            self.pipe = pipe

        def __getattr__(self, command: str) -> Any:
            sent.append(command)
            return getattr(self.pipe, command)

    class Client:
        def pipeline(self, transaction: bool = False) -> Counting:
            return Counting(redis_client.pipeline(transaction=transaction))

    try:
        found = read_snapshot(Client(), now=now).find(name, "Counted")
        assert found is not None and found.ready == 3 and sorted(found.replica_ids) == ids[:3]
        assert "zscore" not in sent and sent.count("zrange") == sent.count("hkeys")  # one per deployment read
        assert sent.count("hlen") >= len(ids)  # in-flight counts: each replica's own keys
    finally:
        redis_client.hdel(_keys.APPS, name)
        redis_client.delete(beats, replicas)
