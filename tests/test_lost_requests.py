"""A request whose job Redis no longer has is failed within seconds, not left to its deadline.

The data-loss marker catches a single Redis that restarted empty. What it cannot see: on a cluster, a shard
other than the applications' restarted without its data; anywhere, a request's keys evicted by a
`maxmemory-policy` that evicts any key, or deleted. A caller waiting on such a request must hear that it was
lost (503, retry) soon, not a 504 at its deadline, and nothing that is still there may be failed. Real Redis,
the real transport; the loss is the request's keys deleted, as a shard restarted empty leaves them.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import redis

from celery_serve import deployment
from celery_serve._runtime.spec import DeploymentSpec, build_spec
from celery_serve._wire import keys as _keys
from celery_serve._wire.transport import QueueTransport


@deployment(request_timeout_s=60)
class Unserved:
    """Only its spec is used: requests are queued and never taken."""


def _spec() -> DeploymentSpec:
    return build_spec(Unserved.bind(), f"lost-{uuid.uuid4().hex[:8]}", None).deployments["Unserved"]


def _run(redis_url: str, scenario: Callable[[QueueTransport, DeploymentSpec, redis.Redis], Awaitable[None]]) -> None:
    """`scenario` with a started transport, a fresh deployment's spec and a plain client; cleaned up after."""
    spec = _spec()
    direct = redis.Redis.from_url(redis_url)

    async def with_transport() -> None:
        transport = QueueTransport(redis_url)
        await transport.start()
        try:
            await scenario(transport, spec, direct)
        finally:
            await transport.close()

    try:
        asyncio.run(with_transport())
    finally:
        direct.delete(spec.queue)
        direct.close()


def test_a_waiting_request_whose_job_redis_lost_fails_with_503_long_before_its_deadline(redis_url: str) -> None:
    async def scenario(transport: QueueTransport, spec: DeploymentSpec, direct: redis.Redis) -> None:
        lost = await transport.submit(spec, args=["lost"])
        kept = await transport.submit(spec, args=["kept"])
        direct.delete(_keys.job(lost.task_id), spec.queue)  # its shard came back empty (the queue with it)
        direct.rpush(spec.queue, b"kept's message stays queued")  # the queue itself is not what is checked
        record = await asyncio.wait_for(transport.wait(lost, spec.name), timeout=30)
        assert record is not None and record["http_status"] == 503, record
        error = record["result"]
        assert error["exc_type"] == "ServiceUnavailableError" and "was lost" in error["exc_message"], error
        assert "Retry it" in error["exc_message"], error
        # the request whose job is still there is not touched: it waits on (for a replica, or its deadline)
        assert not kept.future.done()
        assert transport.waiter.pending_ids() == [kept.task_id]

    _run(redis_url, scenario)


def test_a_request_answered_while_its_loss_is_looked_for_is_not_failed(redis_url: str) -> None:
    """The look and the answer race: a request answered between them (its result stored, its job record gone
    with a shard, say) keeps its answer; only requests with neither job nor result are lost."""

    async def scenario(transport: QueueTransport, spec: DeploymentSpec, direct: redis.Redis) -> None:
        sub = await transport.submit(spec, args=["x"])
        direct.delete(_keys.job(sub.task_id))
        direct.set(_keys.result(sub.task_id), b'{"status": "SUCCESS"}', ex=60)  # the result is there
        assert await transport.lost_requests([sub.task_id]) == 0
        assert not sub.future.done()
        direct.delete(_keys.result(sub.task_id))
        assert await transport.lost_requests([sub.task_id]) == 1
        assert sub.future.done() and sub.future.result()["http_status"] == 503
        assert await transport.lost_requests([sub.task_id]) == 0  # no longer waited for: nothing to fail

    _run(redis_url, scenario)
