"""The Redis side of one replica: taking and acknowledging messages, its heartbeat, its statistics.

`QueueOps` is every queue operation a replica makes, each one script call (see `celery_serve._wire.scripts`);
`Heartbeat` keeps the replica registered and alive, and reaps replicas of the same deployment that died;
`ReplicaStats` counts what the replica did, for the scaler, `/metrics` and `celery-serve status`.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import threading
import time
from typing import Any

import redis
import redis.exceptions

from celery_serve._runtime.spec import DeploymentSpec
from celery_serve._wire import keys as _keys
from celery_serve._wire import scripts as _scripts
from celery_serve._wire.connections import async_client, sync_client
from celery_serve.workers.http import to_jsonable

logger = logging.getLogger(__name__)

Token = str | bytes  # how a taken message is acknowledged (see QueueOps.take)
Done = tuple[Token, str, str, str, str, int]  # (token, job id, reply list, record, job status, retention s)

HEARTBEAT_S = 2.0
ALIVE_TTL_S = 10
REAP_EVERY_S = 5.0
REPLY_TTL_S = 3600


class QueueOps:
    """The Redis side of one replica: take, complete, register, restore."""

    def __init__(self, url: str, spec: DeploymentSpec, replica_id: str) -> None:
        app, deployment = spec.app, spec.name
        self.queue = spec.queue
        self.replica_id = replica_id
        self.claim = _keys.replica_claim(replica_id)
        self.inflight = _keys.replica_inflight(replica_id)
        self.replicas = _keys.replicas(app, deployment)
        self.stats_key = _keys.replica_stats(app, deployment)
        self.redis = async_client(url)
        self.blocking = async_client(url, single_connection=True)
        self._drain = self.redis.register_script(_scripts.DRAIN)
        self._complete = self.redis.register_script(_scripts.COMPLETE)
        self._forward = self.redis.register_script(_scripts.FORWARD)
        self._marker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mark-running")
        self._mark = sync_client(url).register_script(_scripts.MARK_RUNNING)
        self._chord_add = self.redis.register_script(_scripts.CHORD_ADD)
        self._takes = 0

    async def take(self, limit: int, block_s: float) -> list[tuple[str | bytes, bytes]]:
        """What is waiting (up to `limit`), or, when nothing is, the next message as soon as it arrives.

        A message from the blocking pop stays in the claim list and starts at once; its token is
        "@" + the message, which is how it is acknowledged (see `celery_serve._wire.scripts`), and the caller marks its
        job running with `mark_running` (DRAIN does that itself for what it takes)."""
        items = await self._take_now(limit)
        if items or block_s < 0.001:  # Redis reads a timeout under 1 ms as 0: "block forever"
            return items
        # Redis takes a fractional timeout (>= 6.0); redis-py's annotation says int.
        moved = await self.blocking.blmove(self.queue, self.claim, block_s, "RIGHT", "LEFT")  # type: ignore[arg-type]
        if moved is None:
            return []
        moved = moved if isinstance(moved, bytes) else moved.encode()
        return [(b"@" + moved, moved)]

    def mark_running(self, job_id: str) -> None:
        """Mark a claimed message's job running, from a side thread: sync user code may hold the event
        loop for as long as the request runs, and the job must read `running` meanwhile."""
        self._marker.submit(self._mark_sync, job_id)

    def _mark_sync(self, job_id: str) -> None:
        try:
            self._mark(keys=[_keys.job(job_id)], args=[time.time()])
        except redis.exceptions.RedisError as exc:
            logger.debug("could not mark job %s running: %s", job_id, exc)

    async def _take_now(self, limit: int, queue: str | None = None) -> list[tuple[Token, bytes]]:
        """What is waiting now on `queue` (default: the deployment's; a model's queue for affinity)."""
        self._takes += 1
        flat = await self._drain(
            keys=[queue or self.queue, self.claim, self.inflight], args=[limit, f"{self._takes}:", time.time()]
        )
        return [(flat[i].decode(), flat[i + 1]) for i in range(0, len(flat), 2)]

    async def forward(self, token: Token, messages: list[tuple[str, str]], fire_key: str = "") -> bool:
        """Queue a pipeline's next step(s) and acknowledge this message, in one step."""
        args: list[Any] = [token, "1" if fire_key else "0"]
        for queue, message in messages:
            args.extend((queue, message))
        return bool(await self._forward(keys=[self.inflight, self.claim, fire_key or self.inflight], args=args))

    async def chord_add(self, chord: dict[str, Any], value: Any, ttl: int) -> list[Any] | None:
        """Record one parallel branch's result; all branches' results, in order, once every one is in."""
        raw = await self._chord_add(
            keys=[chord["key"]], args=[chord["index"], chord["size"], json.dumps(to_jsonable(value)), ttl]
        )
        return None if raw is None else [json.loads(r) for r in raw]

    async def complete(self, done: list[Done]) -> None:
        """Store results and acknowledge: items are (token, task id, reply list, record, job status, ttl)."""
        args: list[Any] = [time.time(), REPLY_TTL_S]
        for item in done:
            args.extend(item)
        await self._complete(keys=[self.inflight, self.claim], args=args)

    async def close(self) -> None:
        self._marker.shutdown(wait=True)
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


class Heartbeat(threading.Thread):
    """Keeps the replica's alive key fresh and reaps replicas of the same deployment that died.

    A thread with its own connection, so a long synchronous model call cannot make a live replica look dead.
    """

    def __init__(self, url: str, ops: QueueOps, info: dict[str, Any], stats: ReplicaStats) -> None:
        super().__init__(name="celery-serve-heartbeat", daemon=True)
        self.redis: redis.Redis = sync_client(url)
        self.ops = ops
        self.info = info
        self.stats = stats
        self.stopping = threading.Event()
        self._restore = self.redis.register_script(_scripts.RESTORE)

    def register(self) -> None:
        pipe = self.redis.pipeline()
        pipe.set(_keys.replica_alive(self.ops.replica_id), 1, ex=ALIVE_TTL_S)
        pipe.hset(self.ops.replicas, self.ops.replica_id, json.dumps(self.info))
        pipe.execute()

    def run(self) -> None:
        next_reap = 0.0
        while not self.stopping.wait(HEARTBEAT_S):
            try:
                pipe = self.redis.pipeline(transaction=False)
                pipe.set(_keys.replica_alive(self.ops.replica_id), 1, ex=ALIVE_TTL_S)
                pipe.hset(self.ops.stats_key, self.ops.replica_id, json.dumps(self.stats.snapshot()))
                pipe.execute()
                if time.monotonic() >= next_reap:
                    self.reap()
                    next_reap = time.monotonic() + REAP_EVERY_S
            except redis.exceptions.RedisError as exc:
                logger.warning("heartbeat failed: %s", exc)

    def reap(self) -> int:
        restored = 0
        for raw_id in self.redis.hkeys(self.ops.replicas):
            rid = raw_id.decode() if isinstance(raw_id, bytes) else raw_id
            if rid == self.ops.replica_id:
                continue
            n = self.restore(rid, force=False)
            if n >= 0:
                logger.warning(
                    "replica %s stopped heartbeating; put %d unfinished requests back on %s", rid, n, self.ops.queue
                )
                restored += n
        return restored

    def restore(self, replica_id: str, *, force: bool) -> int:
        keys = [
            self.ops.queue,
            _keys.replica_claim(replica_id),
            _keys.replica_inflight(replica_id),
            _keys.replica_alive(replica_id),
            self.ops.replicas,
        ]
        return int(self._restore(keys=keys, args=[replica_id, "1" if force else "0"]))

    def unregister(self) -> int:
        """Hand back whatever is still held and leave the deployment."""
        self.stopping.set()
        try:  # the final counts, for metrics (the last heartbeat may be seconds old)
            self.redis.hset(self.ops.stats_key, self.ops.replica_id, json.dumps(self.stats.snapshot()))
        except redis.exceptions.RedisError as exc:
            logger.warning("could not store final stats: %s", exc)
        return self.restore(self.ops.replica_id, force=True)
