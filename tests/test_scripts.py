"""The Lua scripts' semantics, on the session's real redis-server (fakeredis runs Lua only with lupa).

ENQUEUE is driven through the transport that calls it; the other scripts are called directly.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import orjson
import pytest
import redis

from celery_serve import BackpressureError, deployment
from celery_serve._runtime.spec import build_spec
from celery_serve._wire import keys as _keys
from celery_serve._wire import results as _results
from celery_serve._wire import scripts as _scripts
from celery_serve._wire import streams as _streams
from celery_serve._wire.delivery import DeploymentKeys, HandBack
from celery_serve._wire.envelope import build_message, parse_message
from celery_serve._wire.transport import QueueTransport


@deployment
class Limited:
    """Only its spec is used: requests are queued, never served."""


@dataclass
class Keys:
    queue: str
    claim: str
    inflight: str
    replicas: str
    stats: str
    replica_id: str
    app: str


@pytest.fixture
def keys(redis_client: redis.Redis) -> Iterator[Keys]:
    run = uuid.uuid4().hex[:8]
    replica_id = f"rep-{run}"
    found = Keys(
        queue=_keys.queue(f"scripts-{run}", "Dep"),
        claim=_keys.replica_claim(f"scripts-{run}", "Dep", replica_id),
        inflight=_keys.replica_inflight(f"scripts-{run}", "Dep", replica_id),
        replicas=_keys.replicas(f"scripts-{run}", "Dep"),
        stats=_keys.replica_stats(f"scripts-{run}", "Dep"),
        replica_id=replica_id,
        app=f"scripts-{run}",
    )
    yield found
    redis_client.delete(found.queue, found.claim, found.inflight, found.replicas, found.stats)
    redis_client.delete(_keys.heartbeats(found.app, "Dep"), _keys.dead_letters(found.app, "Dep"))


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


def _enqueue_args(job_id: str, queue: str, limit: int, message: str) -> tuple[list[str], list[object]]:
    """One request's KEYS and ARGV in ENQUEUE's layout (one queue, no idempotency key, no reply list)."""
    now = time.time()
    keys = [_keys.job(job_id), "unused", queue]
    args: list[object] = [1, limit, job_id, now, 60, "a", "Dep", "m", now + 60, 0, "", "async", message]
    return keys, args


def test_one_enqueue_call_of_several_requests_keeps_their_order_limit_and_depths(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """The gateway sends submits that come together in one call; their pushes go in one LPUSH per queue."""
    enqueue = redis_client.register_script(_scripts.ENQUEUE)
    redis_client.lpush(keys.queue, "waiting")
    ids = [f"{keys.replica_id}-{i}" for i in range(4)]
    call_keys: list[str] = []
    call_args: list[object] = [len(ids)]
    for i, job_id in enumerate(ids):
        k, a = _enqueue_args(job_id, keys.queue, 3, f"m{i}")
        call_keys += k
        call_args += a
    try:
        found = enqueue(keys=call_keys, args=call_args)
        # depths as if pushed one by one; the limit counts what this very call queued before
        assert [(int(n), job) for n, job in found] == [(2, ids[0].encode()), (3, ids[1].encode()), (-1, b""), (-1, b"")]
        assert redis_client.lrange(keys.queue, 0, -1) == [b"m1", b"m0", b"waiting"]  # the oldest at the right
        assert redis_client.hget(_keys.job(ids[0]), "status") == b"queued"
        assert not redis_client.exists(_keys.job(ids[2]))  # refused: nothing written for it
    finally:
        redis_client.delete(*(_keys.job(job_id) for job_id in ids))


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


def test_a_drain_resent_after_its_reply_was_lost_answers_what_it_took_and_takes_nothing_more(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """redis-py resends a command once when the connection drops, also after the command ran. A second run of
    one DRAIN call used to take the next messages under the same tokens, overwriting the first run's in the
    in-flight hash: jobs marked running that no replica held (found under Redis filling up, in `make chaos`)."""
    drain = redis_client.register_script(_scripts.DRAIN)
    for message in ("q1", "q2", "q3", "q4", "q5"):
        redis_client.lpush(keys.queue, message)
    call = {"keys": [keys.queue, keys.claim, keys.inflight], "args": [2, "7:", time.time()]}
    first = drain(**call)
    assert first == [b"7:1", b"q1", b"7:2", b"q2"]
    assert drain(**call) == first  # the resend: the same messages under the same tokens, nothing more taken
    assert redis_client.hgetall(keys.inflight) == {b"7:1": b"q1", b"7:2": b"q2"}
    assert redis_client.lrange(keys.queue, 0, -1) == [b"q5", b"q4", b"q3"]
    # a run that took one of its messages fewer than asked (the queue ran dry) is answered whole too
    assert drain(keys=call["keys"], args=[5, "8:", time.time()]) == [b"8:1", b"q3", b"8:2", b"q4", b"8:3", b"q5"]
    assert drain(keys=call["keys"], args=[5, "8:", time.time()]) == [b"8:1", b"q3", b"8:2", b"q4", b"8:3", b"q5"]
    assert redis_client.hlen(keys.inflight) == 5


def test_a_forward_resent_after_its_reply_was_lost_queues_the_next_step_once(
    redis_client: redis.Redis, keys: Keys
) -> None:
    """FORWARD queues a pipeline's next step and acknowledges the step that ran. Run twice for one call (a
    resend after a lost reply, or a retry of `_retrying`), it queued the next step twice; a message this
    replica no longer holds (acknowledged, or handed back to run elsewhere) now queues nothing."""
    forward = redis_client.register_script(_scripts.FORWARD)
    redis_client.hset(keys.inflight, "3:1", "step-1")
    redis_client.lpush(keys.claim, "step-1b")
    nxt = f"{keys.queue}:next"
    try:
        for token in ("3:1", "@step-1b"):
            call = {"keys": [keys.inflight, keys.claim, keys.inflight], "args": [token, "0", nxt, f"after {token}"]}
            assert forward(**call) == 1
            assert forward(**call) == 0
        assert redis_client.lrange(nxt, 0, -1) == [b"after @step-1b", b"after 3:1"]
        assert not redis_client.exists(keys.inflight, keys.claim)
    finally:
        redis_client.delete(nxt)


def test_complete_acknowledges_a_claimed_message_by_value(redis_client: redis.Redis, keys: Keys) -> None:
    complete = redis_client.register_script(_scripts.COMPLETE)
    redis_client.lpush(keys.claim, "first", "second")
    redis_client.hset(keys.inflight, "1:1", "drained")
    task_id = str(uuid.uuid4())
    record = _results.success(task_id, 1)
    args = [time.time(), 60, b"@second", task_id, "", record, "succeeded", 60, "", "", "1:1", "", "", "", "", 0, "", ""]
    complete(keys=[keys.inflight, keys.claim], args=args)
    assert redis_client.lrange(keys.claim, 0, -1) == [b"first"]
    assert redis_client.hlen(keys.inflight) == 0


def _complete(redis_client: redis.Redis, keys: Keys, *items: tuple[str, str, str, str]) -> int:
    """COMPLETE with (token, task id, reply list, record) items: each a succeeded request kept 60 s."""
    complete = redis_client.register_script(_scripts.COMPLETE)
    args: list[object] = [time.time(), 60]  # now, reply list ttl
    for token, task_id, reply, record in items:
        args.extend([token, task_id, reply, record, "succeeded" if task_id else "", 60, "", ""])
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


def test_one_complete_call_answers_every_caller_on_its_own_reply_list_and_acknowledges_all(
    redis_client: redis.Redis, keys: Keys
) -> None:
    ids = [f"task-{keys.replica_id}-{i}" for i in range(4)]
    one, two = _keys.reply(f"{keys.replica_id}-one"), _keys.reply(f"{keys.replica_id}-two")
    redis_client.hset(keys.inflight, mapping={"1:1": "a", "1:2": "b", "1:3": "c", "1:9": "not this one"})
    redis_client.lpush(keys.claim, "claimed")
    items = [("1:1", ids[0], one, "r0"), ("@claimed", ids[1], two, "r1"), ("1:2", ids[2], one, "r2")]
    try:
        assert _complete(redis_client, keys, *items, ("1:3", ids[3], "", "r3")) == 4
        assert redis_client.lrange(one, 0, -1) == [b"r2", b"r0"]  # as pushed one by one
        assert redis_client.lrange(two, 0, -1) == [b"r1"]
        assert 0 < redis_client.ttl(one) <= 60 and 0 < redis_client.ttl(two) <= 60
        assert redis_client.hkeys(keys.inflight) == [b"1:9"]
        assert redis_client.llen(keys.claim) == 0
        assert [redis_client.get(_keys.result(i)) for i in ids] == [b"r0", b"r1", b"r2", b"r3"]
    finally:
        redis_client.delete(one, two, *(_keys.result(i) for i in ids))


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


def test_complete_records_when_a_request_never_marked_running_started(redis_client: redis.Redis, keys: Keys) -> None:
    """A request answered before its job was marked running (see workers.running_marks) still reads when it
    started; one already marked keeps the time its mark wrote."""
    complete = redis_client.register_script(_scripts.COMPLETE)
    fast, slow = f"fast-{keys.replica_id}", f"slow-{keys.replica_id}"
    redis_client.hset(_keys.job(fast), mapping={"status": "queued", "created_at": 100})
    redis_client.hset(_keys.job(slow), mapping={"status": "running", "created_at": 100, "started_at": 101})
    redis_client.hset(keys.inflight, mapping={"1:1": "a", "1:2": "b"})
    args: list[object] = [105, 60]
    args += ["1:1", fast, "", _results.success(fast, 1), "succeeded", 60, 102.5, ""]
    args += ["1:2", slow, "", _results.success(slow, 2), "succeeded", 60, "", ""]
    try:
        assert complete(keys=[keys.inflight, keys.claim], args=args) == 2
        assert redis_client.hmget(_keys.job(fast), "status", "started_at", "finished_at") == [
            b"succeeded",
            b"102.5",
            b"105",
        ]
        assert redis_client.hmget(_keys.job(slow), "status", "started_at", "finished_at") == [
            b"succeeded",
            b"101",
            b"105",
        ]
    finally:
        redis_client.delete(_keys.job(fast), _keys.job(slow), _keys.result(fast), _keys.result(slow))


def test_a_replicas_answer_has_the_shape_complete_reads() -> None:
    """COMPLETE reads its arguments in groups of a fixed size; every answer (`Done`) is one group."""
    from celery_serve.workers.replica_redis import Done, acknowledge_only

    stride = re.search(r"for i = 3, #ARGV, (\d+) do", _scripts.COMPLETE)
    assert stride is not None and len(Done._fields) == int(stride.group(1))
    assert len(acknowledge_only("1:1")) == len(Done._fields)


def test_complete_ends_a_stream_with_its_result_once_even_when_retried(redis_client: redis.Redis, keys: Keys) -> None:
    """A streamed response's end (or error) entry is written by COMPLETE, with the result: whoever reads the
    stream's end finds the job ended. A retried call (its answer lost) adds no second entry."""
    complete = redis_client.register_script(_scripts.COMPLETE)
    ok, bad = f"streamed-{keys.replica_id}", f"streamed-bad-{keys.replica_id}"
    again = f"streamed-again-{keys.replica_id}"  # a redelivered stream: its error goes in with id '*'
    for job_id in (ok, bad, again):
        redis_client.hset(_keys.job(job_id), mapping={"status": "running", "created_at": 100})
        redis_client.xadd(_streams.key(job_id), {"k": "h", "d": "{}"}, id=_streams.HEAD_ID)
        redis_client.xadd(_streams.key(job_id), {"k": "c", "t": "s", "d": "x"}, id=_streams.chunk_id(0))
    error = {"exc_type": "ValueError", "exc_message": "café"}
    end = _streams.tail(300, _streams.chunk_id(1), {"k": "e", "n": 1})
    failed = _streams.tail(300, _streams.chunk_id(1), {"k": "x", "d": orjson.dumps(error).decode(), "s": 500})
    args: list[object] = [105, 60]
    args += ["", ok, "", _results.success(ok, {"chunks": 1}), "succeeded", 60, "", end]
    args += ["", bad, "", _results.success(bad, None), "failed", 60, "", failed]
    unknown = _streams.tail(300, "*", {"k": "x", "d": orjson.dumps(error).decode(), "s": 500})
    args += ["", again, "", _results.success(again, None), "failed", 60, "", unknown]
    try:
        assert complete(keys=[keys.inflight, keys.claim], args=args) == 3
        assert complete(keys=[keys.inflight, keys.claim], args=args) == 0  # retried: nothing is written twice
        entries = redis_client.xrange(_streams.key(ok))
        assert [e[0] for e in entries] == [b"0-1", b"0-2", b"0-3"]
        assert entries[-1][1] == {b"k": b"e", b"n": b"1"}
        last = redis_client.xrange(_streams.key(bad))[-1]
        assert last[0] == b"0-3" and last[1][b"k"] == b"x" and last[1][b"s"] == b"500"
        assert orjson.loads(last[1][b"d"]) == error  # the message's bytes as they were (UTF-8 included)
        assert len(redis_client.xrange(_streams.key(bad))) == 3
        redelivered = redis_client.xrange(_streams.key(again))
        assert len(redelivered) == 3 and redelivered[-1][1][b"k"] == b"x"  # one error entry, after the chunk
        assert 0 < redis_client.ttl(_streams.key(ok)) <= 300
        assert redis_client.hget(_keys.job(ok), "status") == b"succeeded"
    finally:
        for job_id in (ok, bad, again):
            redis_client.delete(_keys.job(job_id), _keys.result(job_id), _streams.key(job_id))


def test_complete_with_no_result_key_just_acknowledges(redis_client: redis.Redis, keys: Keys) -> None:
    redis_client.hset(keys.inflight, "1:1", "unreadable")
    assert _complete(redis_client, keys, ("1:1", "", "", "")) == 0
    assert redis_client.hlen(keys.inflight) == 0


def _restore(redis_client: redis.Redis, keys: Keys, force: bool, max_deliveries: int = 3, count: bool = True) -> int:
    restored, _dead = HandBack(redis_client, _dep_keys(keys), max_deliveries)(keys.replica_id, force=force, count=count)
    return restored


def _dep_keys(keys: Keys) -> DeploymentKeys:
    return DeploymentKeys(keys.app, "Dep", keys.queue)


def _beat(redis_client: redis.Redis, keys: Keys, ttl_s: float) -> None:
    beat = redis_client.register_script(_scripts.HEARTBEAT)
    dep = _dep_keys(keys)
    beat(keys=[dep.heartbeats, dep.replicas, keys.stats], args=[keys.replica_id, ttl_s, json.dumps({"pid": 1}), ""])


def _held(redis_client: redis.Redis, keys: Keys) -> None:
    redis_client.lpush(keys.queue, "waiting")
    redis_client.hset(keys.inflight, "1:1", _message("in-flight"))
    redis_client.lpush(keys.claim, _message("claimed"))
    redis_client.hset(keys.replicas, keys.replica_id, json.dumps({"pid": 1}))


def _message(task_id: str) -> str:
    return build_message(task_id=task_id, app="scripts", deployment="Dep", method="m", args=[1])


def test_restore_leaves_a_live_replica_alone(redis_client: redis.Redis, keys: Keys) -> None:
    _held(redis_client, keys)
    _beat(redis_client, keys, ttl_s=60)
    assert _restore(redis_client, keys, force=False) == -1
    assert redis_client.hlen(keys.inflight) == 1 and redis_client.llen(keys.claim) == 1
    assert redis_client.hexists(keys.replicas, keys.replica_id)


def test_restore_of_a_stale_replica_puts_its_messages_next_in_line_counting_a_delivery(
    redis_client: redis.Redis, keys: Keys
) -> None:
    _held(redis_client, keys)
    _beat(redis_client, keys, ttl_s=-1)  # its heartbeat ran out a second ago (by Redis's clock)
    assert _restore(redis_client, keys, force=False) == 2
    claimed, in_flight, waiting = redis_client.rpop(keys.queue, 3)
    assert waiting == b"waiting"
    assert [parse_message(claimed).task_id, parse_message(in_flight).task_id] == ["claimed", "in-flight"]
    assert parse_message(claimed).deliveries == parse_message(in_flight).deliveries == 1
    assert not redis_client.exists(keys.inflight, keys.claim)
    assert not redis_client.hexists(keys.replicas, keys.replica_id)
    assert redis_client.zscore(_dep_keys(keys).heartbeats, keys.replica_id) is None


def test_forced_restore_hands_back_even_when_alive(redis_client: redis.Redis, keys: Keys) -> None:
    _held(redis_client, keys)
    _beat(redis_client, keys, ttl_s=60)
    assert _restore(redis_client, keys, force=True) == 2
    assert redis_client.llen(keys.queue) == 3
    assert not redis_client.exists(keys.inflight, keys.claim)


def test_a_shutdown_hand_back_counts_no_delivery(redis_client: redis.Redis, keys: Keys) -> None:
    _held(redis_client, keys)
    assert _restore(redis_client, keys, force=True, count=False) == 2
    assert [parse_message(m).deliveries for m in redis_client.rpop(keys.queue, 2)] == [0, 0]


def test_deliveries_count_up_and_at_the_limit_the_request_fails_into_the_dead_letter_list(
    redis_client: redis.Redis, keys: Keys
) -> None:
    job_id = f"poison-{uuid.uuid4().hex[:6]}"
    reply = f"serve:reply:test-{job_id}"
    redis_client.hset(_keys.job(job_id), mapping={"status": "running", "reply": reply, "retention_s": 60})
    message = _message(job_id)
    for delivery in (1, 2):
        redis_client.hset(keys.inflight, "1:1", message)
        assert _restore(redis_client, keys, force=True, max_deliveries=3) == 1
        message = redis_client.rpop(keys.queue).decode()
        assert parse_message(message).deliveries == delivery
    redis_client.hset(keys.inflight, "1:1", message)
    restored, dead = HandBack(redis_client, _dep_keys(keys), 3)(keys.replica_id, force=True)
    assert (restored, dead) == (0, 1)
    assert redis_client.llen(keys.queue) == 0
    record = json.loads(redis_client.get(_keys.result(job_id)))
    assert record["status"] == "FAILURE" and record["result"]["exc_type"] == "ReplicaCrashError"
    assert "died 3 times" in record["result"]["exc_message"]
    assert redis_client.hget(_keys.job(job_id), "status") == b"failed"
    assert json.loads(redis_client.rpop(reply))["task_id"] == job_id  # the waiting caller learns at once
    entry = json.loads(redis_client.lindex(_dep_keys(keys).dead_letters, 0))
    assert entry["job_id"] == job_id and entry["deliveries"] == 3
    assert parse_message(entry["message"]).task_id == job_id  # kept whole, so it can be replayed
    redis_client.delete(_keys.job(job_id), _keys.result(job_id), reply, _dep_keys(keys).dead_letters)


def test_stale_lists_expired_and_unregistered_replicas_only(redis_client: redis.Redis, keys: Keys) -> None:
    dep = _dep_keys(keys)
    stale = redis_client.register_script(_scripts.STALE)
    _beat(redis_client, keys, ttl_s=60)
    assert stale(keys=[dep.heartbeats, dep.replicas], args=[10]) == []
    _beat(redis_client, keys, ttl_s=-1)
    redis_client.hset(dep.replicas, "never-beat", "{}")
    assert sorted(stale(keys=[dep.heartbeats, dep.replicas], args=[10])) == sorted(
        [keys.replica_id.encode(), b"never-beat"]
    )
    redis_client.delete(dep.heartbeats)


def test_handback_returns_taken_messages_uncounted(redis_client: redis.Redis, keys: Keys) -> None:
    handback = redis_client.register_script(_scripts.HANDBACK)
    redis_client.hset(keys.inflight, "1:1", "a")
    redis_client.lpush(keys.claim, "b")
    assert handback(keys=[keys.queue, keys.inflight, keys.claim], args=["1:1", "@b", "1:9", "@zz"]) == 2
    assert redis_client.rpop(keys.queue, 2) == [b"a", b"b"]
    assert not redis_client.exists(keys.inflight, keys.claim)


def test_bury_dead_letters_an_unreadable_message_and_fails_its_job(redis_client: redis.Redis, keys: Keys) -> None:
    bury = redis_client.register_script(_scripts.BURY)
    job_id = f"bad-{uuid.uuid4().hex[:6]}"
    redis_client.hset(_keys.job(job_id), mapping={"status": "running", "retention_s": 60})
    raw = json.loads(_message(job_id))
    raw["content-type"] = "application/x-python-serialize"
    redis_client.hset(keys.inflight, "2:1", json.dumps(raw))
    dlq = _dep_keys(keys).dead_letters
    assert bury(keys=[keys.inflight, keys.claim, dlq], args=["2:1", "refused: pickle", 0, "now"]) == 1
    assert not redis_client.hexists(keys.inflight, "2:1")
    record = json.loads(redis_client.get(_keys.result(job_id)))
    assert record["result"]["exc_type"] == "BadRequestError" and record["http_status"] == 400
    assert json.loads(redis_client.lindex(dlq, 0))["reason"] == "refused: pickle"
    redis_client.delete(_keys.job(job_id), _keys.result(job_id), dlq)


def test_stream_head_opens_a_stream_once_and_tells_the_waiting_caller(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """STREAM_HEAD (through the replica's StreamWriter): head and first chunk, the job marked streamed, the
    STREAMING record carrying the first chunk on the reply list, the HTTP caller counted as a reader; a second
    head for the same request (a redelivery after its replica died mid-stream) is refused and writes nothing."""
    from celery_serve._wire import streams as _streams
    from celery_serve._wire.connections import async_client
    from celery_serve.workers.streaming import StreamWriter

    job_id = f"stream-{uuid.uuid4().hex[:8]}"
    reply = _keys.reply(f"gw-{job_id}")
    env = parse_message(
        build_message(
            task_id=job_id, app="scripts", deployment="Dep", method="m", reply_to=reply, http_reply=True, retention_s=60
        )
    )
    redis_client.hset(_keys.job(job_id), "status", "running")

    async def open_twice() -> tuple[bool, bool]:
        client = async_client(redis_url)
        try:
            writer = StreamWriter(client, env, _streams.StreamLimits(10, 1000))
            first = await writer.head({"status_code": 200, "headers": [["content-type", "text/plain"]]}, "tok")
            again = await StreamWriter(client, env, _streams.StreamLimits(10, 1000)).head({"status_code": 500}, "x")
            return first, again
        finally:
            await client.aclose()

    assert asyncio.run(open_twice()) == (True, False)
    entries = redis_client.xrange(_streams.key(job_id))
    assert [e[0] for e in entries] == [_streams.HEAD_ID.encode(), _streams.chunk_id(0).encode()]
    assert json.loads(entries[0][1][b"d"])["status_code"] == 200 and entries[1][1][b"d"] == b"tok"
    assert 0 < redis_client.ttl(_streams.key(job_id)) <= 60 + 60 + 1
    assert redis_client.hget(_keys.job(job_id), "stream") == b"1"
    told = [json.loads(r) for r in redis_client.lrange(reply, 0, -1)]
    assert len(told) == 1 and told[0]["status"] == _streams.STREAMING and told[0]["task_id"] == job_id
    assert _streams.chunk_of_record(told[0]["first"]) == (_streams.TEXT, b"tok")
    assert redis_client.get(_streams.readers_key(job_id)) == b"1"
    redis_client.delete(_streams.key(job_id), _keys.job(job_id), reply, _streams.readers_key(job_id))


def test_a_stream_head_marks_its_job_running_in_place_of_the_running_mark(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """A request from the blocking pop waits for its running mark; when it streams, its head marks the job
    (one call fewer, none from the mark thread while the head is on its way). A job that already says when it
    started keeps that."""
    from celery_serve._wire.connections import async_client
    from celery_serve.workers.running_marks import RunningMarks
    from celery_serve.workers.streaming import StreamWriter

    marks = RunningMarks(redis_url)
    fresh, marked = (f"stream-{uuid.uuid4().hex[:8]}" for _ in range(2))
    redis_client.hset(_keys.job(fresh), mapping={"status": "queued", "created_at": 100})
    redis_client.hset(_keys.job(marked), mapping={"status": "running", "created_at": 100, "started_at": 101})
    with marks._lock:  # pending, its thread not woken: as if the head came before the thread's turn
        marks._pending.update({fresh: 102.5, marked: 103.0})

    async def open_both() -> None:
        client = async_client(redis_url)
        try:
            for job_id in (fresh, marked):
                env = parse_message(build_message(task_id=job_id, app="scripts", deployment="Dep", method="m"))
                assert await StreamWriter(client, env, _streams.StreamLimits(10, 1000), marks=marks).head({}, "a")
        finally:
            await client.aclose()

    try:
        asyncio.run(open_both())
        assert redis_client.hmget(_keys.job(fresh), "status", "started_at") == [b"running", b"102.5"]
        assert redis_client.hmget(_keys.job(marked), "status", "started_at") == [b"running", b"101"]
        assert marks._pending == {}  # no mark left to send
    finally:
        marks.close()
        redis_client.delete(*(k for j in (fresh, marked) for k in (_keys.job(j), _streams.key(j))))


def test_a_stream_head_that_fails_or_cannot_open_leaves_its_start_to_the_running_mark(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """The head takes the pending running mark's start time to record it; when the head's call fails (a Redis
    fault) or cannot open the stream (a redelivery of a stream that already started), the mark goes out after
    all, with the time the request really started: the job reads running, and says when it started."""
    from celery_serve._wire.connections import async_client
    from celery_serve.workers.running_marks import RunningMarks
    from celery_serve.workers.streaming import StreamWriter
    from tests.conftest import wait_until

    failed, reopened = (f"stream-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for job_id in (failed, reopened):
        redis_client.hset(_keys.job(job_id), mapping={"status": "queued", "created_at": 100})
    redis_client.xadd(_streams.key(reopened), {"k": "h", "d": "{}"}, id=_streams.HEAD_ID)  # its first delivery's
    marks = RunningMarks(redis_url)
    with marks._lock:  # pending, its thread not woken: as if the head came before the thread's turn
        marks._pending.update({failed: 102.5, reopened: 103.5})

    async def broken(**_: object) -> int:
        raise redis.ConnectionError("connection reset while the head was on its way")

    async def open_both() -> None:
        client = async_client(redis_url)
        try:
            env = parse_message(build_message(task_id=failed, app="scripts", deployment="Dep", method="m"))
            with pytest.raises(redis.ConnectionError):
                await StreamWriter(client, env, _streams.StreamLimits(10, 1000), opener=broken, marks=marks).head({})
            env = parse_message(build_message(task_id=reopened, app="scripts", deployment="Dep", method="m"))
            assert not await StreamWriter(client, env, _streams.StreamLimits(10, 1000), marks=marks).head({}, "a")
        finally:
            await client.aclose()

    try:
        asyncio.run(open_both())
        for job_id, at in ((failed, b"102.5"), (reopened, b"103.5")):
            wait_until(
                lambda job_id=job_id: redis_client.hget(_keys.job(job_id), "status") == b"running",
                5,
                what=f"{job_id} marked running",
            )
            assert redis_client.hget(_keys.job(job_id), "started_at") == at
    finally:
        marks.close()
        redis_client.delete(*(k for j in (failed, reopened) for k in (_keys.job(j), _streams.key(j))))
