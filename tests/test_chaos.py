"""The whole fault-injection suite (`make chaos`; excluded from the default run by the `chaos` marker).

Every test runs steady load through a real stack (tests/chaos.py), injects one fault, heals it, and checks the
ledger: every accepted request ended exactly once in a terminal state with the right result (or failed with a
reason that says what happened), nothing lost, nothing stuck; executions are counted.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
from redis.exceptions import RedisError

from celery_serve import Client
from celery_serve._runtime.launcher import flower_command, free_port
from celery_serve.exceptions import ServeError
from tests.chaos import Ledger, Report, Stack
from tests.conftest import start_gateway, wait_until

PARTITION_S = 20  # how long the partition lasts: the fault under test, not a wait for something

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(400)]


@pytest.fixture
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    options = getattr(request, "param", {})
    built = Stack(tmp_path, {"chaos": "tests.chaos_deployments:echo_app"}, **options).start()
    try:
        yield built
    finally:
        built.stop()


def _all_served(report: Report) -> None:
    # messages as strings: pytest cuts any other object's repr to 240 characters, and the sample of problem
    # jobs (where each one is) is what tells a failure's cause
    assert report.accepted > 30, str(report)
    assert not report.lost and not report.stuck and not report.wrong, str(report)
    assert report.succeeded == report.accepted, str(report)


def test_replicas_killed_every_few_seconds(stack: Stack) -> None:
    ledger = Ledger(stack)
    ledger.load("Echo", threads=3, sleep_s=0.05)
    for _ in range(6):
        ledger.await_accepted(60)  # a kill after every 60 accepted requests (~3 s here)
        pids = stack.replica_pids("chaos", "Echo")
        if pids:
            victim = random.choice(pids)
            os.kill(victim, signal.SIGKILL)
            # The next kill waits for the replacement: a request the victim held then gets a fair run. Kills
            # faster than replicas restart can hit the replica running the same redelivered request three times,
            # and dead-lettering it then is right (it looks like a request that kills replicas).
            wait_until(
                lambda victim=victim: victim not in (alive := stack.heartbeating("chaos", "Echo")) and len(alive) == 2,
                30,
                what="the killed replica's replacement",
            )
    ledger.await_accepted(40)  # and traffic after the last kill
    ledger.finish()
    report = ledger.check(grace_s=90)
    _all_served(report)


def test_a_whole_worker_killed_and_started_again(stack: Stack) -> None:
    ledger = Ledger(stack)
    ledger.load("Echo", threads=3, interval_s=0.1, sleep_s=0.02)  # ~30 requests/s, a third of capacity
    ledger.await_accepted(60)
    worker = stack.workers["chaos.Echo"].proc
    for process in [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]:
        process.kill()  # the machine died: nobody hands anything back
    worker.wait()
    ledger.await_accepted(20)  # the machine stays down while requests keep queueing for it
    stack.start_worker("chaos", "Echo")  # a new worker's replicas reap the dead ones and serve what they held
    ledger.await_accepted(100)  # load goes on while the new worker starts and catches up
    ledger.finish()
    report = ledger.check(grace_s=120)
    _all_served(report)


def test_the_gateway_killed_and_started_again(stack: Stack) -> None:
    ledger = Ledger(stack)
    ledger.load("Echo", threads=2, interval_s=0.1, sleep_s=0.2)
    ledger.await_accepted(20)
    gateway = next(p for p in stack.group.processes if p.name == "gateway")
    gateway.proc.kill()
    gateway.proc.wait()
    stack.group.processes.remove(gateway)
    stack.gateway_url = start_gateway(stack.group, stack.url, stack.child_env)
    ledger.await_accepted(20)  # served by the new gateway
    ledger.finish()
    report = ledger.check(grace_s=60)
    _all_served(report)


@pytest.mark.parametrize("stack", [{"appendonly": True}], indirect=True)
def test_redis_restarted_with_persistence_under_load(stack: Stack) -> None:
    ledger = Ledger(stack)
    ledger.load("Echo", threads=3)
    ledger.await_accepted(30)
    stack.restart_redis(down_s=1.0)
    ledger.await_accepted(30)  # accepted again after the restart
    ledger.finish()
    report = ledger.check(grace_s=90)
    _all_served(report)


@pytest.mark.parametrize("stack", [{"appendonly": True}], indirect=True)
def test_sync_callers_waiting_across_a_redis_restart_and_pause_are_answered_never_told_lost(stack: Stack) -> None:
    """Callers that wait (the Python client over Redis) on requests that take longer than the lost-request look
    (2 s), across a Redis restart with persistence and a pause. Nothing is lost, so no caller may be told its
    request was lost: each accepted call is answered with its own result; a call refused while Redis was away
    says so (and was never accepted)."""
    outcomes: list[tuple[str, object]] = []
    lock = threading.Lock()
    stop = threading.Event()

    def loop() -> None:
        with Client(redis_url=stack.url, app="chaos", timeout_s=60) as client:
            while not stop.is_set():
                value = uuid.uuid4().hex
                try:
                    outcome: object = client.call("Echo", value, sleep_s=2.5) == {"echo": value}
                except Exception as exc:  # noqa: BLE001 - every outcome is recorded and judged below
                    outcome = exc
                with lock:
                    outcomes.append((value, outcome))

    threads = [threading.Thread(target=loop, daemon=True) for _ in range(4)]
    for thread in threads:
        thread.start()

    def answered_more(than: int) -> None:
        """Until `than` more calls are answered: each fault lands among calls that wait, and is over."""
        with lock:
            target = sum(1 for _, o in outcomes if o is True) + than
        wait_until(lambda: sum(1 for _, o in outcomes if o is True) >= target, 90, what=f"{than} more calls answered")

    answered_more(4)
    stack.restart_redis(down_s=1.0)  # calls are waiting on their replicas meanwhile
    answered_more(8)
    stack.pause_redis(5)
    answered_more(8)
    stop.set()
    for thread in threads:
        thread.join(90)
    wrong = [(v, o) for v, o in outcomes if o is False]
    lost = [(v, o) for v, o in outcomes if isinstance(o, Exception) and "was lost" in str(o)]
    other = [(v, o) for v, o in outcomes if isinstance(o, Exception) and not isinstance(o, (ServeError, RedisError))]
    answered = sum(1 for _, o in outcomes if o is True)
    assert not wrong and not lost and not other, (wrong, lost, other)
    assert answered >= 20, outcomes


def test_redis_paused_under_load(stack: Stack) -> None:
    ledger = Ledger(stack)
    ledger.load("Echo", threads=3)
    ledger.await_accepted(20)
    stack.pause_redis(5)
    ledger.await_accepted(20)  # accepted again once the pause is over
    ledger.finish()
    report = ledger.check(grace_s=60)
    assert report.refused > 0, report  # answered 503 while paused, never left hanging
    _all_served(report)


def test_a_partition_of_twenty_seconds_then_healed(stack: Stack) -> None:
    """Every process talks to Redis through the proxy: black-holing it is the worker and gateway host cut off.
    Requests accepted before the cut end once it heals (run, or expired past their deadline); none is stuck."""
    assert stack.tcp is not None
    ledger = Ledger(stack)
    ledger.load("Echo", threads=3)
    ledger.await_accepted(30)
    stack.tcp.black_hole()
    time.sleep(PARTITION_S)  # the fault itself: the hosts stay cut off this long
    stack.tcp.heal()
    ledger.await_accepted(20, timeout_s=90)  # accepted again once healed
    ledger.finish()
    report = ledger.check(grace_s=120)
    assert not report.lost and not report.stuck and not report.wrong, str(report)
    assert report.succeeded + report.ended["expired"] == report.accepted, str(report)


def test_connections_flapping(stack: Stack) -> None:
    assert stack.tcp is not None
    pids = stack.replica_pids("chaos", "Echo")
    ledger = Ledger(stack)
    ledger.load("Echo", threads=3)
    until = time.monotonic() + 10
    while time.monotonic() < until:
        stack.tcp.reset_all()
        time.sleep(0.3)  # the fault's rhythm: every connection reset three times a second
    ledger.await_accepted(20)
    ledger.finish()
    report = ledger.check(grace_s=90)
    _all_served(report)
    assert stack.replica_pids("chaos", "Echo") == pids


def test_scaler_killed(tmp_path: Path) -> None:
    built = Stack(tmp_path, {"chaos": "tests.chaos_deployments:echo_app"}, scaler=True).start()
    try:
        ledger = Ledger(built)
        ledger.load("Echo", threads=2)
        ledger.await_accepted(20)
        scaler = next(p for p in built.group.processes if p.name == "scaler")
        scaler.proc.kill()
        ledger.await_accepted(30)  # serving goes on without it
        ledger.finish()
        report = ledger.check(grace_s=60)
        _all_served(report)
        wait_until(lambda: len(built.heartbeating("chaos", "Echo")) == 2, 10, what="replicas unaffected")
    finally:
        built.stop()


def test_flower_stopped_then_killed(stack: Stack) -> None:
    """Flower is a monitor: stopped (its event subscription backs up) or killed, serving goes on untouched."""
    port = free_port()
    env = {**stack.child_env, "FLOWER_BASIC_AUTH": "chaos:chaos-password"}
    flower = stack.group.start("flower", flower_command(port), env=env)

    def answers() -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{port}/healthcheck", timeout=2).status_code < 500
        except httpx.HTTPError:
            return False

    wait_until(answers, 90, interval_s=0.5, what="Flower to answer")
    ledger = Ledger(stack)
    ledger.load("Echo", threads=3)
    ledger.await_accepted(30)
    os.kill(flower.proc.pid, signal.SIGSTOP)
    ledger.await_accepted(60)  # served while Flower is stopped and its event subscription backs up
    os.kill(flower.proc.pid, signal.SIGCONT)
    ledger.await_accepted(20)
    flower.proc.kill()
    flower.proc.wait()
    ledger.await_accepted(30)  # and after it is gone
    ledger.finish()
    report = ledger.check(grace_s=60)
    _all_served(report)
    wait_until(lambda: len(stack.heartbeating("chaos", "Echo")) == 2, 10, what="replicas unaffected")
