"""The Redis side of one replica: taking and acknowledging messages, its heartbeat, its statistics.

`QueueOps` is every queue operation a replica makes, each one script call (see `celery_serve._wire.scripts`);
`Liveness` keeps the replica registered and alive (a heartbeat that re-registers it every time, so a replica
that was stalled and reaped rejoins by itself) and, while it holds the deployment's reaper lease, hands back the
work of replicas whose heartbeat ran out: O(replicas) calls in all, not every replica checking every other;
`ReplicaStats` counts what the replica did, for the scaler, `/metrics` and `celery-serve status`.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import redis

from celery_serve._runtime.spec import DeploymentSpec
from celery_serve._wire import keys as _keys
from celery_serve._wire import scripts as _scripts
from celery_serve._wire.connections import REDIS_FAULTS, async_client, breaks_connection, is_cluster, sync_client
from celery_serve._wire.delivery import DeploymentKeys, HandBack, now_iso
from celery_serve._wire.jobs import TERMINAL
from celery_serve._wire.slots import key_slot
from celery_serve.workers.http import to_jsonable
from celery_serve.workers.running_marks import RunningMarks

logger = logging.getLogger(__name__)

Token = str | bytes  # how a taken message is acknowledged (see QueueOps.take)


class Done(NamedTuple):
    """One answered (or only acknowledged) message, as the COMPLETE script takes it: its fields, in this order,
    are one group of that script's arguments (see `celery_serve._wire.scripts.COMPLETE`)."""

    token: Token
    job_id: str  # '' to acknowledge only (nothing is stored)
    reply: str  # the caller's reply list, or ''
    record: str
    status: str  # the job's terminal status
    retention_s: int
    started: float | str  # when it started (epoch s), or '' when the job records it
    stream_tail: str = ""  # a streamed response's last entry (see `celery_serve.workers.streaming.StreamWriter.end`)


def acknowledge_only(token: Token) -> Done:
    return Done(token, "", "", "", "", 0, "")


HEARTBEAT_S = 2.0
ALIVE_TTL_S = 10  # a replica whose heartbeat is this old is stale: its work is handed back
REAP_EVERY_S = 5.0
REPLY_TTL_S = 3600
IDLE_FRESH_S = 0.005  # a replica whose blocking pop left the queue empty, back within this time, skips the drain


class QueueOps:
    """The Redis side of one replica: take, complete, register, restore."""

    def __init__(self, url: str, spec: DeploymentSpec, replica_id: str) -> None:
        app, deployment = spec.app, spec.name
        self.queue = spec.queue
        self.replica_id = replica_id
        self.claim = _keys.replica_claim(app, deployment, replica_id)
        self.inflight = _keys.replica_inflight(app, deployment, replica_id)
        self.replicas = _keys.replicas(app, deployment)
        self.stats_key = _keys.replica_stats(app, deployment)
        self.keys = DeploymentKeys(app, deployment, self.queue)
        # On a Redis Cluster a script touches one slot: what a pipeline's later step writes to its job's slot
        # goes in calls of its own, before the acknowledgement in this deployment's slot (see `complete`).
        self.cluster = is_cluster(url)
        self.slot = key_slot(_keys.deployment_slot_key(app, deployment))
        self.redis = async_client(url)
        self.blocking = async_client(url, single_connection=True)
        self._drain = self.redis.register_script(_scripts.DRAIN)
        self._complete = self.redis.register_script(_scripts.COMPLETE)
        self._forward = self.redis.register_script(_scripts.FORWARD)
        self.marks = RunningMarks(url)
        self._chord_add = self.redis.register_script(_scripts.CHORD_ADD)
        self._handback = self.redis.register_script(_scripts.HANDBACK)
        self._bury = self.redis.register_script(_scripts.BURY)
        self._takes = 0
        self._idle = False  # the last blocking pop left the queue empty (see take)
        self._popped_at = 0.0  # when it returned (monotonic)
        self.batched: Callable[[], bool] = lambda: False  # batched replicas always drain first (set by the consumer)

    async def take(self, limit: int, block_s: float) -> list[tuple[str | bytes, bytes]]:
        """What is waiting (up to `limit`), or, when nothing is, the next message as soon as it arrives.

        A message from the blocking pop stays in the claim list and starts at once; its token is
        "@" + the message, which is how it is acknowledged (see `celery_serve._wire.scripts`), and the caller marks its
        job running with `mark_running` (DRAIN does that itself for what it takes)."""
        # Straight to the blocking pop only right after one that left the queue empty: a replica that was busy
        # longer may have requests waiting, some of them cancelled, which only a drain skips.
        idle = self._idle and time.monotonic() - self._popped_at < IDLE_FRESH_S and not self.batched()
        if not idle or block_s < 0.001:
            items = await self._take_now(limit)
            if items or block_s < 0.001:  # Redis reads a timeout under 1 ms as 0: "block forever"
                return items
        # The queue's length right after the pop rides in the same round trip (Redis runs it once the pop
        # returns): a pop that left the queue empty means the replica keeps up, and the next take goes straight
        # to the blocking pop (a drain would find nothing: a round trip saved per request at low load); one that
        # left messages waiting found a backlog, which the next take drains in one call.
        pipe = self.blocking.pipeline(transaction=False)
        # Redis takes a fractional timeout (>= 6.0); redis-py's annotation says int.
        pipe.blmove(self.queue, self.claim, block_s, "RIGHT", "LEFT")  # type: ignore[arg-type]
        pipe.llen(self.queue)
        moved, waiting = await pipe.execute()
        self._popped_at = time.monotonic()
        self._idle = moved is None or int(waiting) == 0
        if moved is None:
            return []
        moved = moved if isinstance(moved, bytes) else moved.encode()
        return [(b"@" + moved, moved)]

    def mark_running(self, job_id: str) -> None:
        """Mark a claimed message's job running, from a side thread (see workers.running_marks)."""
        self.marks.started(job_id)

    async def _take_now(self, limit: int, queue: str | None = None) -> list[tuple[Token, bytes]]:
        """What is waiting now on `queue` (default: the deployment's; a model's queue for affinity)."""
        self._takes += 1
        flat = await self._drain(
            keys=[queue or self.queue, self.claim, self.inflight], args=[limit, f"{self._takes}:", time.time()]
        )
        return [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]

    async def ended_jobs(self, job_ids: set[str]) -> set[str]:
        """Which of these jobs already ended (cancelled, expired, failed in another branch): one pipelined read
        of their statuses (on a cluster, of the jobs a pipeline's later steps name in other slots)."""
        if not job_ids:
            return set()
        ordered = sorted(job_ids)
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in ordered:
                pipe.hget(_keys.job(job_id), "status")
            statuses = await pipe.execute()
        return {job_id for job_id, raw in zip(ordered, statuses, strict=True) if raw and raw.decode() in TERMINAL}

    async def hand_back(self, tokens: list[Token]) -> int:
        """Put taken messages back on the queue, to be taken next, without counting a delivery."""
        if not tokens:
            return 0
        return int(await self._handback(keys=[self.queue, self.inflight, self.claim], args=list(tokens)))

    async def bury(self, token: Token, reason: str) -> bool:
        """Dead-letter a message this replica cannot read, failing its job when its id is readable."""
        return bool(
            await self._bury(
                keys=[self.inflight, self.claim, self.keys.dead_letters], args=[token, reason, time.time(), now_iso()]
            )
        )

    async def held(self) -> tuple[set[str], list[bytes]]:
        """What Redis records this replica as holding: in-flight tokens and claimed messages."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hkeys(self.inflight)
        pipe.lrange(self.claim, 0, -1)
        tokens, claimed = await pipe.execute()
        return {t.decode() if isinstance(t, bytes) else t for t in tokens}, list(claimed)

    async def reset_connections(self, fault: BaseException, taking: bool = False) -> None:
        """After `fault`, drop the pooled connections that may be dead or half-read (see `breaks_connection`).

        Only idle ones: a connection another task has a command in flight on fails by itself if it is broken,
        and cutting it would lose the reply of a command that may have run. `taking`: called by the take loop,
        the blocking connection's only user, which is then idle and is dropped too."""
        if not breaks_connection(fault):
            return
        for client, everything in ((self.redis, False), (self.blocking, taking)):
            try:
                await client.connection_pool.disconnect(inuse_connections=everything)
            except Exception as exc:  # noqa: BLE001 - best effort: new connections are made on demand
                logger.debug("could not reset connections: %s", exc)

    async def forward(
        self, token: Token, messages: list[tuple[str, str]], fire_key: str = "", task_id: str = "", job_id: str = ""
    ) -> bool:
        """Queue a pipeline's next step(s) and acknowledge this message, in one step (on a cluster, in three)."""
        if self.cluster:
            return await self._forward_across_slots(token, messages, fire_key, task_id, job_id)
        args: list[Any] = [token, "1" if fire_key else "0"]
        for queue, message in messages:
            args.extend((queue, message))
        return bool(await self._forward(keys=[self.inflight, self.claim, fire_key or self.inflight], args=args))

    async def _forward_across_slots(
        self, token: Token, messages: list[tuple[str, str]], fire_key: str, task_id: str, job_id: str
    ) -> bool:
        """FORWARD where the next steps' queues and the chord are in other slots: fire once (the branch that
        fired may fire again: a redelivery of it after a crash), queue, then acknowledge. A crash between the
        steps runs this step again; its next step may then run twice, and its result is stored once.

        A pipeline whose job already ended (cancelled, expired, or failed in another branch) goes no further:
        on a single Redis the next step's take drops it (the take reads the job's status); here the next step's
        message names a job key in its own slot, so the pipeline's job is read before queueing (one round trip)."""
        if job_id and await self.ended_jobs({job_id}):
            logger.info("pipeline %s ended: its next step is not queued", job_id)
            await self._acknowledge(token)
            return False
        if fire_key:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.hsetnx(fire_key, "fired", task_id or "1")
                pipe.hget(fire_key, "fired")
                _, fired_by = await pipe.execute()
            if fired_by is not None and fired_by.decode() != (task_id or "1"):
                await self._acknowledge(token)
                return False
        if messages:
            async with self.redis.pipeline(transaction=False) as pipe:
                for queue, message in messages:
                    pipe.lpush(queue, message)
                await pipe.execute()
        await self._acknowledge(token)
        return True

    async def _acknowledge(self, token: Token) -> None:
        """Acknowledge a taken message and queue nothing (FORWARD with no next step)."""
        await self._forward(keys=[self.inflight, self.claim, self.inflight], args=[token, "0"])

    async def chord_add(self, chord: dict[str, Any], value: Any, ttl: int) -> list[Any] | None:
        """Record one parallel branch's result; all branches' results, in order, once every one is in."""
        raw = await self._chord_add(
            keys=[chord["key"]], args=[chord["index"], chord["size"], json.dumps(to_jsonable(value)), ttl]
        )
        return None if raw is None else [json.loads(r) for r in raw]

    async def complete(self, done: list[Done]) -> None:
        """Store results and acknowledge: items are `Done` tuples.

        On a cluster, results of jobs in another slot (a pipeline's last step) are stored first, by a call in
        their slot, and acknowledged after, with the rest: a crash between the two runs the step again, and the
        first stored result stands."""
        now = time.time()
        if self.cluster:
            elsewhere: dict[int, list[Done]] = {}
            for item in done:
                if item.job_id and key_slot(_keys.result(item.job_id)) != self.slot:
                    elsewhere.setdefault(key_slot(_keys.result(item.job_id)), []).append(item)
            for items in elsewhere.values():
                args: list[Any] = [now, REPLY_TTL_S]
                for item in items:
                    args.extend(item._replace(token=""))  # no token: nothing to acknowledge in that slot
                job_id = items[0].job_id
                await self._complete(keys=[_keys.job(job_id), _keys.result(job_id)], args=args)
            if elsewhere:
                moved = {id(item) for items in elsewhere.values() for item in items}
                done = [acknowledge_only(item.token) if id(item) in moved else item for item in done]
        args = [now, REPLY_TTL_S]
        for item in done:
            args.extend(item)
        await self._complete(keys=[self.inflight, self.claim], args=args)

    async def close(self) -> None:
        self.marks.close()
        await self.blocking.aclose()
        await self.redis.aclose()


class ReplicaStats:
    """What a replica has done: requests, and how they were grouped (batch sizes, for metrics)."""

    def __init__(self) -> None:
        self.requests = 0
        self.batches = 0
        self.errors = 0  # requests answered with an error (failed, expired or cancelled)
        self.batch_sizes: dict[int, int] = {}

    def record_batch(self, size: int) -> None:
        self.requests += size
        self.batches += 1
        self.batch_sizes[size] = self.batch_sizes.get(size, 0) + 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "errors": self.errors,
            "batch_sizes": {str(k): v for k, v in sorted(self.batch_sizes.items())},
            "at": time.time(),
        }


class Liveness(threading.Thread):
    """The replica's heartbeat and, while it holds the deployment's reaper lease, the reaper.

    A thread with its own connection, so a long synchronous model call cannot make a live replica look dead.
    Every heartbeat re-registers the replica: one reaped while it was stalled (SIGSTOP, a long pause) rejoins
    at its next beat, and its late results change nothing (the first terminal write wins).
    """

    def __init__(self, url: str, ops: QueueOps, info: dict[str, Any], stats: ReplicaStats, max_deliveries: int) -> None:
        super().__init__(name="celery-serve-liveness", daemon=True)
        self.redis: redis.Redis = sync_client(url)
        self.ops = ops
        self.keys = ops.keys
        self.info = json.dumps(info)
        self.stats = stats
        self.stopping = threading.Event()
        self._beat = self.redis.register_script(_scripts.HEARTBEAT)
        self._stale = self.redis.register_script(_scripts.STALE)
        self._lead = self.redis.register_script(_scripts.LEAD)
        self.hand_back = HandBack(self.redis, self.keys, max_deliveries)

    def beat(self) -> None:
        self._beat(
            keys=[self.keys.heartbeats, self.keys.replicas, self.ops.stats_key],
            args=[self.ops.replica_id, ALIVE_TTL_S, self.info, json.dumps(self.stats.snapshot())],
        )

    def register(self) -> None:
        self.beat()

    def run(self) -> None:
        next_reap = 0.0
        # No reaping until this replica's own beats have gone through for a whole ALIVE_TTL_S: when they failed
        # (Redis full, paused or out of reach), the others' failed for the same reason, and reaping them as soon
        # as Redis is back would run their requests twice and count a delivery (a crash) against each. A
        # replica that really died is reaped that much later, or sooner by a replica whose beats went through.
        failed_at = -float(ALIVE_TTL_S)
        while not self.stopping.wait(HEARTBEAT_S):
            try:
                self.beat()
                if time.monotonic() >= next_reap and time.monotonic() - failed_at >= ALIVE_TTL_S:
                    next_reap = time.monotonic() + REAP_EVERY_S
                    if self._lead(keys=[self.keys.reaper_lease], args=[self.ops.replica_id, int(REAP_EVERY_S * 2500)]):
                        self.reap()
            except REDIS_FAULTS as exc:
                failed_at = time.monotonic()
                logger.warning("heartbeat failed: %s", exc)

    def reap(self) -> int:
        """Hand back the work of this deployment's stale replicas (their heartbeat ran out)."""
        restored = 0
        for raw_id in self._stale(keys=[self.keys.heartbeats, self.keys.replicas], args=[100]):
            rid = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            if rid == self.ops.replica_id:
                continue
            n, dead = self.hand_back(rid, force=False)
            if n >= 0:
                logger.warning(
                    "replica %s stopped heartbeating; put %d unfinished requests back on %s%s",
                    rid,
                    n,
                    self.ops.queue,
                    f" and gave up on {dead} that had killed replicas too often" if dead else "",
                )
                restored += n
        return restored

    def unregister(self) -> int:
        """Hand back whatever is still held (not counted as a delivery: it was not a crash) and leave."""
        self.stopping.set()
        try:  # the final counts, for metrics (the last heartbeat may be seconds old)
            self.redis.hset(self.ops.stats_key, self.ops.replica_id, json.dumps(self.stats.snapshot()))
        except REDIS_FAULTS as exc:
            logger.warning("could not store final stats: %s", exc)
        restored, _ = self.hand_back(self.ops.replica_id, force=True, count=False)
        return restored
