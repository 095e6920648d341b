"""Redis options at the door: the replica wait (`SERVE_REDIS_WAIT_REPLICAS`) and the connection budget."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
import redis

from celery_serve._runtime.launcher import ProcessGroup
from celery_serve._runtime.spec import build_spec
from celery_serve._wire import keys as _keys
from celery_serve._wire import scripts as _scripts
from celery_serve._wire.connections import DEFAULT_MAX_CONNECTIONS, async_client, max_connections
from celery_serve._wire.transport import QueueTransport, ReplicaWait
from celery_serve.exceptions import DeploymentConfigError
from tests.deployments import probe_app
from tests.redis_topologies import start_sentinel_set


def test_the_replica_wait_and_the_budget_are_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ReplicaWait.from_env() == ReplicaWait(0, 1000)
    monkeypatch.setenv("SERVE_REDIS_WAIT_REPLICAS", "2")
    monkeypatch.setenv("SERVE_REDIS_WAIT_TIMEOUT_MS", "250")
    assert ReplicaWait.from_env() == ReplicaWait(2, 250)
    assert ReplicaWait.from_env(replicas=1) == ReplicaWait(1, 250)
    monkeypatch.setenv("SERVE_REDIS_WAIT_REPLICAS", "two")
    with pytest.raises(DeploymentConfigError, match="SERVE_REDIS_WAIT_REPLICAS must be an integer >= 0, got 'two'"):
        ReplicaWait.from_env()
    assert max_connections() == DEFAULT_MAX_CONNECTIONS
    monkeypatch.setenv("SERVE_REDIS_MAX_CONNECTIONS", "0")
    with pytest.raises(DeploymentConfigError, match="SERVE_REDIS_MAX_CONNECTIONS must be an integer from 1"):
        max_connections()
    monkeypatch.setenv("SERVE_REDIS_MAX_CONNECTIONS", "8")
    assert async_client("redis://127.0.0.1:1/0").connection_pool.max_connections == 8


def test_a_request_no_replica_confirmed_is_refused_and_withdrawn(redis_url: str) -> None:
    """A single Redis has no replicas: with a wait of 1 every submit is refused, and nothing is left to run."""
    spec = build_spec(probe_app, "waited", "/waited")

    async def submit() -> None:
        transport = QueueTransport(redis_url, wait_replicas=1, wait_timeout_ms=50)
        await transport.start()
        try:
            with pytest.raises(redis.exceptions.ConnectionError, match="only 0 of the 1 Redis replicas"):
                await transport.submit(spec.deployments[spec.ingress], args=[1], task_id="withdrawn-1")
        finally:
            await transport.close()

    asyncio.run(submit())
    client = redis.Redis.from_url(redis_url)
    job = client.hgetall(_keys.job("withdrawn-1"))
    assert job[b"status"] == b"cancelled"  # ended: no replica will run it
    assert b"was not accepted" in client.get(_keys.result("withdrawn-1"))
    assert client.llen(spec.deployments[spec.ingress].queue) == 0  # and taken off the queue


def _enqueue_args(job_id: str, queue: str, idempotency_key: str = "") -> tuple[list[str], list[object]]:
    """KEYS and ARGV of an ENQUEUE call for one request (the layout `QueueTransport.submit` sends)."""
    now = time.time()
    keys = [_keys.job(job_id), _keys.idempotency("waittest", "Probe", idempotency_key or job_id), queue]
    args: list[object] = [1, 1, -1, job_id, now, 600, "waittest", "Probe", "__call__", now + 60]
    args += [1 if idempotency_key else 0, "", "async", f'{{"headers":{{"serve_job":"{job_id}"}}}}']
    return keys, args


def test_a_request_found_already_there_is_confirmed_by_the_replicas_too() -> None:
    """An enqueue that finds its request already there (redis-py resent it after a lost answer, or its
    idempotency key was used) must not let the WAIT after it answer at once: the first call's write may be on no
    replica yet. Redis's current source moves the offset WAIT waits for only when a connection's own command
    wrote something (`call()` in server.c), so ENQUEUE rewrites what it found. (The 6.2 and 7.0 servers here
    move it with every command, so on them this passes without the rewrite too.)"""
    group = ProcessGroup()
    try:
        topology = start_sentinel_set(group, replicas=1, sentinels=1)
        master = redis.Redis(port=topology.master_port)
        sha = master.script_load(_scripts.ENQUEUE)
        replica = topology.nodes[topology.replica_ports[0]].proc
        queue = "serve.waittest.Probe"

        sent: dict[str, tuple[list[str], list[object]]] = {}  # a call resent is the same call: the same arguments

        def enqueue_and_wait(job_id: str, idempotency_key: str = "", wait_ms: int = 300) -> tuple[list[object], int]:
            keys, args = sent.setdefault(job_id, _enqueue_args(job_id, queue, idempotency_key))
            with redis.Redis(port=topology.master_port) as fresh, fresh.pipeline(transaction=False) as pipe:
                pipe.evalsha(sha, len(keys), *keys, *args)
                pipe.wait(1, wait_ms)
                enqueued, confirmed = pipe.execute()
            return [int(enqueued[0][0]), enqueued[0][1].decode()], int(confirmed)

        master.set("serve:waittest:online", 1)
        assert master.wait(1, 10_000) == 1, "the replica did not come online"  # it counts for WAIT from now on
        replica.send_signal(signal.SIGSTOP)  # the replica holds nothing written from now on
        try:
            assert enqueue_and_wait("first-1")[1] == 0  # a new request: not confirmed
            # the same enqueue again, on another connection (as redis-py's retry after a reset): found, and still
            # not confirmed, since no replica holds the first write
            assert enqueue_and_wait("first-1") == ([-2, "first-1"], 0)
            assert enqueue_and_wait("second-1", idempotency_key="key-1")[1] == 0
            assert enqueue_and_wait("second-2", idempotency_key="key-1") == ([0, "second-1"], 0)
        finally:
            replica.send_signal(signal.SIGCONT)
        # once the replica runs again, both are confirmed, and the jobs are as the first calls wrote them
        assert enqueue_and_wait("first-1", wait_ms=10_000) == ([-2, "first-1"], 1)
        assert enqueue_and_wait("second-3", idempotency_key="key-1", wait_ms=10_000) == ([0, "second-1"], 1)
        assert master.llen(queue) == 2 and master.hget(_keys.job("first-1"), "status") == b"queued"
    finally:
        group.stop()
