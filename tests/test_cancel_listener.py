"""A replica's cancel listener across Redis going away: it must come back by itself and catch the cancels it
missed, or `DELETE /jobs/{id}` silently stops reaching that replica's running requests. Real Redis, reached
through a TCP proxy that resets connections and then refuses new ones for a while."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from types import MethodType, SimpleNamespace
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis

from celery_serve._runtime.launcher import ProcessGroup, free_port, start_embedded_redis
from celery_serve._wire import keys as _keys
from celery_serve._wire.connections import async_client
from celery_serve.workers.consumer import ReplicaServer
from tests.tcp_proxy import TcpProxy


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
def tcp_redis() -> Iterator[str]:
    """A private redis-server on a loopback port (the session's listens on a Unix socket); its URL."""
    group = ProcessGroup()
    try:
        yield start_embedded_redis(group, port=free_port())
    finally:
        group.stop()


def test_the_cancel_listener_outlives_redis_going_away_and_catches_the_cancels_it_missed(tcp_redis: str) -> None:
    redis_url = tcp_redis
    port = urlsplit(redis_url).port or 6379
    proxy = TcpProxy("127.0.0.1", port).start()
    through_proxy = redis_url.replace(f"127.0.0.1:{port}", proxy.address)
    channel = _keys.cancel_channel("cancel-listener", "Dep")

    async def scenario() -> None:
        direct = aioredis.from_url(redis_url)
        replica = SimpleNamespace(
            replica=SimpleNamespace(name="Dep", app=SimpleNamespace(name="cancel-listener")),
            ops=SimpleNamespace(redis=async_client(through_proxy)),
            _running={},
        )
        replica._cancel_missed = MethodType(ReplicaServer._cancel_missed, replica)
        listener = asyncio.create_task(ReplicaServer._listen_for_cancels(replica))  # type: ignore[arg-type]

        async def subscribed() -> None:
            deadline = time.monotonic() + 10
            while dict(await direct.pubsub_numsub(channel)).get(channel.encode(), 0) < 1:
                assert time.monotonic() < deadline and not listener.done(), "the listener did not subscribe"
                await asyncio.sleep(0.02)

        def running(job_id: str) -> asyncio.Task[None]:
            task = asyncio.create_task(asyncio.sleep(60))
            replica._running[job_id] = task
            return task

        try:
            first = running("first")
            await subscribed()
            await direct.publish(channel, "first")
            await until(first.cancelled, "a cancel to reach a running request")

            # Redis unreachable for longer than one retry: connections reset, new ones refused
            proxy.refusing = True
            proxy.reset_all()
            await asyncio.sleep(1.5)
            missed = running("missed")
            await direct.hset(_keys.job("missed"), "status", "cancelled")  # as FINISH writes it ...
            await direct.publish(channel, "missed")  # ... and its cancel, which nobody hears now
            proxy.refusing = False

            await until(missed.cancelled, "the missed cancel to be caught after subscribing again")
            assert not listener.done(), listener  # it used to end with RuntimeError here
            later = running("later")
            await subscribed()
            await direct.publish(channel, "later")
            await until(later.cancelled, "a cancel after the outage to be heard")
        finally:
            listener.cancel()
            for task in replica._running.values():
                task.cancel()
            await direct.delete(_keys.job("missed"))
            await direct.aclose()

    try:
        asyncio.run(scenario())
    finally:
        proxy.stop()
