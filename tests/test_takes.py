"""How a replica takes work (workers.replica_redis.QueueOps.take), on a real Redis: a drain first, except right
after a blocking pop that left the queue empty, when the replica goes straight back to the blocking pop (a drain
would find nothing: one round trip less per request at low load)."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

import pytest
import redis

from celery_serve import deployment
from celery_serve._runtime.spec import build_spec
from celery_serve.workers import replica_redis
from celery_serve.workers.replica_redis import QueueOps, Token

# How fresh a pop must be to skip the drain, in these tests: the product's 5 ms is shorter than a loaded CI
# machine's pause between two awaits (a take counted as not fresh there, and the test failed once in CI).
FRESH_S = 0.25


@deployment
class Idle:
    """Only its spec is used."""


class CountedOps:
    """A replica's QueueOps with its drains counted."""

    def __init__(self, redis_url: str) -> None:
        spec = build_spec(Idle.bind(), f"takes-{uuid.uuid4().hex[:8]}", None).deployments["Idle"]
        self.ops = QueueOps(redis_url, spec, f"takes-{uuid.uuid4().hex[:6]}")
        self.r = redis.Redis.from_url(redis_url)
        self.drains = 0
        drain = self.ops._take_now

        async def counted(limit: int, queue: str | None = None) -> list[tuple[Token, bytes]]:
            self.drains += 1
            return await drain(limit, queue)

        self.ops._take_now = counted  # type: ignore[method-assign]

    async def close(self) -> None:
        self.r.delete(self.ops.queue, self.ops.claim, self.ops.inflight)
        self.r.close()
        await self.ops.close()


def test_a_replica_skips_the_drain_only_right_after_a_pop_that_left_the_queue_empty(redis_url: str) -> None:
    async def scenario(c: CountedOps) -> None:
        ops = c.ops
        assert await ops.take(8, block_s=0.1) == []  # nothing queued: a drain, then a pop that times out
        assert c.drains == 1
        threading.Timer(0.05, lambda: c.r.lpush(ops.queue, b'{"m": 1}')).start()
        got = await ops.take(8, block_s=2.0)  # right after a pop that waited: straight to the pop
        assert got == [(b'@{"m": 1}', b'{"m": 1}')] and c.drains == 1
        await asyncio.sleep(FRESH_S * 4)  # busy a while: requests may be waiting, some cancelled
        assert await ops.take(8, block_s=0.1) == [] and c.drains == 2
        ops.batched = lambda: True  # a batch fills from drains, never pop by pop
        assert await ops.take(8, block_s=0.1) == [] and c.drains == 3

    _run(redis_url, scenario)


def test_a_pop_that_left_messages_waiting_is_followed_by_a_drain_and_one_that_did_not_is_not(redis_url: str) -> None:
    """Whether the queue is empty is read in the pop's own round trip, not guessed from how long the pop took:
    a pop answered at once may have taken the only message (no drain next), and one that waited may have been
    answered with a burst behind it (a drain next)."""

    async def scenario(c: CountedOps) -> None:
        ops = c.ops
        assert await ops.take(8, block_s=0.05) == [] and c.drains == 1  # idle: drain, then a pop that times out
        c.r.lpush(ops.queue, b'{"m": 1}')
        assert len(await ops.take(8, block_s=1.0)) == 1 and c.drains == 1  # the pop answers at once, queue empty
        c.r.lpush(ops.queue, b'{"m": 2}')
        assert len(await ops.take(8, block_s=1.0)) == 1 and c.drains == 1  # so this take pops again: no drain
        threading.Timer(0.05, lambda: c.r.lpush(ops.queue, b'{"m": 3}', b'{"m": 4}', b'{"m": 5}')).start()
        assert len(await ops.take(8, block_s=2.0)) == 1 and c.drains == 1  # a pop that waited, for a burst of 3
        assert len(await ops.take(8, block_s=1.0)) == 2 and c.drains == 2  # two wait behind it: one drain

    _run(redis_url, scenario)


def test_requests_queued_while_the_replica_was_busy_are_drained_together(redis_url: str) -> None:
    async def scenario(c: CountedOps) -> None:
        assert await c.ops.take(8, block_s=0.05) == []  # idle
        for i in range(3):
            c.r.lpush(c.ops.queue, f'{{"m": {i}}}')
        await asyncio.sleep(FRESH_S * 2)
        assert len(await c.ops.take(8, block_s=1.0)) == 3 and c.drains == 2  # one drain takes them all

    _run(redis_url, scenario)


@pytest.fixture(autouse=True)
def _fresh_for_a_while(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(replica_redis, "IDLE_FRESH_S", FRESH_S)


def _run(redis_url: str, scenario: Any) -> None:
    async def main() -> None:
        counted = CountedOps(redis_url)
        try:
            await scenario(counted)
        finally:
            await counted.close()

    asyncio.run(main())


def test_resetting_connections_after_a_fault_never_cuts_a_command_in_flight(redis_url: str) -> None:
    """A replica drops its pooled connections after a Redis fault. It used to drop those other tasks had
    commands in flight on too, and on any fault: an out-of-memory refusal of one call cut the reply of another
    call that had run (a take), which redis-py then resent. Now an error reply drops nothing, and a connection
    fault drops the idle connections only (the take loop's own blocking one too, when the take failed)."""

    name = f"takes-reset-{uuid.uuid4().hex[:8]}"  # the session's Redis has other clients, blocked ones too

    def clients() -> dict[int, bytes]:
        listed = redis.Redis.from_url(redis_url).client_list()
        return {int(c["id"]): str(c["cmd"]).encode() for c in listed if c.get("name") == name}

    async def scenario(c: CountedOps) -> None:
        ops = c.ops
        ops.redis.connection_pool.connection_kwargs["client_name"] = name  # every connection it makes is named
        in_flight = asyncio.create_task(ops.redis.blpop([f"{ops.queue}:x"], timeout=1))
        await asyncio.sleep(0.2)
        idle = int(await ops.redis.execute_command("CLIENT", "ID"))  # another pooled connection, idle once answered
        (blocked,) = [cid for cid, cmd in clients().items() if cmd == b"blpop"]
        await ops.reset_connections(redis.exceptions.ResponseError("OOM command not allowed when used memory"))
        await asyncio.sleep(0.1)
        assert {idle, blocked} <= clients().keys()  # an error reply: every connection is sound, none dropped
        await ops.reset_connections(redis.exceptions.ConnectionError("Connection reset by peer"))
        await asyncio.sleep(0.1)
        assert idle not in clients() and blocked in clients()
        c.r.lpush(f"{ops.queue}:x", b"answer")
        assert await in_flight == (f"{ops.queue}:x".encode(), b"answer")
        assert blocked in clients()  # answered on the connection it was sent on, not resent on another

    _run(redis_url, scenario)
