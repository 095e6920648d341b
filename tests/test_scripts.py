"""The Lua scripts' semantics, on the session's real redis-server (fakeredis runs Lua only with lupa).

ENQUEUE is driven through the transport that calls it; the other scripts are called directly.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from celery_serve import BackpressureError, deployment
from celery_serve._runtime.spec import build_spec
from celery_serve._wire import keys as _keys
from celery_serve._wire import results as _results
from celery_serve._wire import scripts as _scripts
from celery_serve._wire.envelope import parse_message
from celery_serve._wire.transport import QueueTransport


@deployment
class Limited:
    """Only its spec is used: requests are queued, never served."""


@dataclass
class Keys:
    queue: str
    claim: str
    inflight: str
    alive: str
    replicas: str
    replica_id: str


@pytest.fixture
def keys(redis_client: redis.Redis) -> Iterator[Keys]:
    run = uuid.uuid4().hex[:8]
    replica_id = f"rep-{run}"
    found = Keys(
        queue=_keys.queue(f"scripts-{run}", "Dep"),
        claim=_keys.replica_claim(replica_id),
        inflight=_keys.replica_inflight(replica_id),
        alive=_keys.replica_alive(replica_id),
        replicas=_keys.replicas(f"scripts-{run}", "Dep"),
        replica_id=replica_id,
    )
    yield found
    redis_client.delete(*vars(found).values())


def _submit_all(redis_url: str, max_queued_requests: int, count: int) -> tuple[list[str], str]:
    """Submit `count` requests through the transport (the ENQUEUE script): ok/full for each, and the queue."""
    app = f"scripts-{uuid.uuid4().hex[:8]}"
    spec = build_spec(Limited.options(max_queued_requests=max_queued_requests).bind(), app, None)

    async def main() -> list[str]:
        transport = QueueTransport(redis_url)
        await transport.start()
        outcomes = []
        try:
            for i in range(count):
                try:
                    await transport.submit(spec.deployments["Limited"], "m", [i], expect_reply=False)
                    outcomes.append("ok")
                except BackpressureError:
                    outcomes.append("full")
        finally:
            await transport.close()
        return outcomes

    return asyncio.run(main()), spec.deployments["Limited"].queue


def test_enqueue_refuses_past_the_limit(redis_url: str, redis_client: redis.Redis) -> None:
    outcomes, queue = _submit_all(redis_url, max_queued_requests=2, count=4)
    try:
        assert outcomes == ["ok", "ok", "full", "full"]
        waiting = [parse_message(m).args for m in redis_client.lrange(queue, 0, -1)]
        assert waiting == [[1], [0]]  # newest at the head; the consuming end is the right
    finally:
        redis_client.delete(queue)


def test_enqueue_unbounded(redis_url: str, redis_client: redis.Redis) -> None:
    outcomes, queue = _submit_all(redis_url, max_queued_requests=-1, count=5)
    try:
        assert outcomes == ["ok"] * 5 and redis_client.llen(queue) == 5
    finally:
        redis_client.delete(queue)


def test_drain_takes_the_oldest_into_the_inflight_hash(redis_client: redis.Redis, keys: Keys) -> None:
    drain = redis_client.register_script(_scripts.DRAIN)
    for message in ("q1", "q2", "q3"):
        redis_client.lpush(keys.queue, message)  # q1 is the oldest (the consuming end is the right)
    redis_client.lpush(keys.claim, "claimed")  # a message a blocking pop started: not DRAIN's to take
    flat = drain(keys=[keys.queue, keys.claim, keys.inflight], args=[2, "7:", time.time()])
    taken = [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]
    assert taken == [("7:1", b"q1"), ("7:2", b"q2")]
    assert redis_client.hgetall(keys.inflight) == {b"7:1": b"q1", b"7:2": b"q2"}
    assert redis_client.lrange(keys.queue, 0, -1) == [b"q3"]
    assert redis_client.lrange(keys.claim, 0, -1) == [b"claimed"]
    assert drain(keys=[keys.queue, keys.claim, keys.inflight], args=[5, "8:", time.time()]) == [b"8:1", b"q3"]
    assert drain(keys=[keys.queue, keys.claim, keys.inflight], args=[5, "9:", time.time()]) == []


def test_complete_acknowledges_a_claimed_message_by_value(redis_client: redis.Redis, keys: Keys) -> None:
    complete = redis_client.register_script(_scripts.COMPLETE)
    redis_client.lpush(keys.claim, "first", "second")
    redis_client.hset(keys.inflight, "1:1", "drained")
    task_id = str(uuid.uuid4())
    record = _results.success(task_id, 1)
    args = [time.time(), 60, b"@second", task_id, "", record, "succeeded", 60, "1:1", "", "", "", "", 0]
    complete(keys=[keys.inflight, keys.claim], args=args)
    assert redis_client.lrange(keys.claim, 0, -1) == [b"first"]
    assert redis_client.hlen(keys.inflight) == 0


def _complete(redis_client: redis.Redis, keys: Keys, *items: tuple[str, str, str, str]) -> int:
    """COMPLETE with (token, task id, reply list, record) items: each a succeeded request kept 60 s."""
    complete = redis_client.register_script(_scripts.COMPLETE)
    args: list[object] = [time.time(), 60]  # now, reply list ttl
    for token, task_id, reply, record in items:
        args.extend([token, task_id, reply, record, "succeeded" if task_id else "", 60])
    return int(complete(keys=[keys.inflight, keys.claim], args=args))


def test_complete_stores_publishes_replies_and_acknowledges(redis_client: redis.Redis, keys: Keys) -> None:
    task_id = f"task-{keys.replica_id}"
    result_key, reply = _keys.result(task_id), _keys.reply(keys.replica_id)
    redis_client.hset(keys.inflight, mapping={"1:1": "msg", "1:2": "other"})
    pubsub = redis_client.pubsub()
    pubsub.subscribe(result_key)
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    try:
        assert _complete(redis_client, keys, ("1:1", task_id, reply, '{"status":"SUCCESS"}')) == 1
        assert redis_client.get(result_key) == b'{"status":"SUCCESS"}'
        assert 0 < redis_client.ttl(result_key) <= 60
        assert redis_client.lrange(reply, 0, -1) == [b'{"status":"SUCCESS"}']
        assert redis_client.hkeys(keys.inflight) == [b"1:2"]
        published = pubsub.get_message(timeout=5)
        assert published is not None and published["data"] == b'{"status":"SUCCESS"}'
    finally:
        pubsub.close()
        redis_client.delete(result_key, reply)


def test_complete_first_writer_wins_and_the_second_is_only_acknowledged(redis_client: redis.Redis, keys: Keys) -> None:
    task_id = f"task-{keys.replica_id}"
    result_key, reply = _keys.result(task_id), _keys.reply(keys.replica_id)
    redis_client.hset(keys.inflight, mapping={"1:1": "first copy", "2:1": "redelivered copy"})
    try:
        assert _complete(redis_client, keys, ("1:1", task_id, reply, "first")) == 1
        assert _complete(redis_client, keys, ("2:1", task_id, reply, "second")) == 0
        assert redis_client.get(result_key) == b"first"
        assert redis_client.lrange(reply, 0, -1) == [b"first"]  # the caller is answered once
        assert redis_client.hlen(keys.inflight) == 0
    finally:
        redis_client.delete(result_key, reply)


def test_complete_with_no_result_key_just_acknowledges(redis_client: redis.Redis, keys: Keys) -> None:
    redis_client.hset(keys.inflight, "1:1", "unreadable")
    assert _complete(redis_client, keys, ("1:1", "", "", "")) == 0
    assert redis_client.hlen(keys.inflight) == 0


def _restore(redis_client: redis.Redis, keys: Keys, force: bool) -> int:
    restore = redis_client.register_script(_scripts.RESTORE)
    return int(
        restore(
            keys=[keys.queue, keys.claim, keys.inflight, keys.alive, keys.replicas],
            args=[keys.replica_id, "1" if force else "0"],
        )
    )


def _held(redis_client: redis.Redis, keys: Keys) -> None:
    redis_client.lpush(keys.queue, "waiting")
    redis_client.hset(keys.inflight, "1:1", "in flight")
    redis_client.lpush(keys.claim, "claimed")
    redis_client.hset(keys.replicas, keys.replica_id, json.dumps({"pid": 1}))


def test_restore_leaves_a_live_replica_alone(redis_client: redis.Redis, keys: Keys) -> None:
    _held(redis_client, keys)
    redis_client.set(keys.alive, 1, ex=60)
    assert _restore(redis_client, keys, force=False) == -1
    assert redis_client.hlen(keys.inflight) == 1 and redis_client.llen(keys.claim) == 1
    assert redis_client.hexists(keys.replicas, keys.replica_id)


def test_restore_of_a_dead_replica_puts_its_messages_next_in_line(redis_client: redis.Redis, keys: Keys) -> None:
    _held(redis_client, keys)
    assert _restore(redis_client, keys, force=False) == 2
    assert redis_client.rpop(keys.queue, 3) == [b"claimed", b"in flight", b"waiting"]
    assert not redis_client.exists(keys.inflight, keys.claim)
    assert not redis_client.hexists(keys.replicas, keys.replica_id)


def test_forced_restore_hands_back_even_when_alive(redis_client: redis.Redis, keys: Keys) -> None:
    _held(redis_client, keys)
    redis_client.set(keys.alive, 1, ex=60)
    assert _restore(redis_client, keys, force=True) == 2
    assert redis_client.llen(keys.queue) == 3
    assert not redis_client.exists(keys.alive, keys.inflight, keys.claim)
