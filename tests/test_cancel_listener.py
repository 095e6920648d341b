"""A replica's cancel listener across Redis going away: it must come back by itself and catch the cancels it
missed, or `DELETE /jobs/{id}` silently stops reaching that replica's running requests. Real Redis, reached
through a TCP proxy that resets connections and then refuses new ones for a while."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Callable, Iterator
from types import MethodType, SimpleNamespace

import pytest
import redis
import redis.asyncio as aioredis

from celery_serve._runtime.launcher import free_port, redis_server_binary
from celery_serve._wire import keys as _keys
from celery_serve._wire.connections import async_client
from celery_serve.workers.consumer import ReplicaServer
from tests.conftest import wait_until
from tests.tcp_proxy import TcpProxy


async def until(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


@pytest.fixture
def tcp_redis() -> Iterator[int]:
    """A private redis-server on a loopback port (the session's listens on a Unix socket)."""
    port = free_port()
    proc = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        probe = redis.Redis(port=port, socket_connect_timeout=1)
        wait_until(lambda: _pings(probe), 15, what="redis-server to answer")
        probe.close()
        yield port
    finally:
        proc.kill()
        proc.wait()


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False


def test_the_cancel_listener_outlives_redis_going_away_and_catches_the_cancels_it_missed(tcp_redis: int) -> None:
    redis_url = f"redis://127.0.0.1:{tcp_redis}/0"
    proxy = TcpProxy("127.0.0.1", tcp_redis).start()
    channel = _keys.cancel_channel("cancel-listener", "Dep")

    async def scenario() -> None:
        direct = aioredis.from_url(redis_url)
        replica = SimpleNamespace(
            replica=SimpleNamespace(name="Dep", app=SimpleNamespace(name="cancel-listener")),
            ops=SimpleNamespace(redis=async_client(proxy.url())),
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
