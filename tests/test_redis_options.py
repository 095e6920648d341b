"""Redis options at the door: the replica wait (`SERVE_REDIS_WAIT_REPLICAS`) and the connection budget."""

from __future__ import annotations

import asyncio

import pytest
import redis

from celery_serve._runtime.spec import build_spec
from celery_serve._wire import keys as _keys
from celery_serve._wire.connections import DEFAULT_MAX_CONNECTIONS, async_client, max_connections
from celery_serve._wire.transport import QueueTransport, ReplicaWait
from celery_serve.exceptions import DeploymentConfigError
from tests.deployments import probe_app


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
