"""What a replica of a multiplexed deployment takes, in order (model affinity; see `celery_serve._wire.affinity`):

1. requests on the queues of the models it holds (or is loading): no load needed;
2. requests on the deployment's shared queue (those that name no model);
3. requests on any other model's queue whose oldest request has waited `SERVE_MULTIPLEX_FALLBACK_S`
   (default 0.5 s): that model's holders are busy, or no replica holds it; this replica will load it;
4. nothing waiting: it blocks on the shared queue.

No polling: every request put on a model queue is announced on the deployment's wake channel. A replica
blocked on the shared queue that holds the model is unblocked at once (`CLIENT UNBLOCK` on its blocking
connection); the others are unblocked `SERVE_MULTIPLEX_FALLBACK_S` later, to take it if it still waits.

Every take is the same DRAIN script on another list, so claimed messages are acknowledged, handed back and
restored exactly as for the shared queue (a dead replica's messages go back to the shared queue).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from datetime import datetime
from typing import Any

import orjson
import redis.exceptions

from celery_serve._wire.affinity import model_index, model_queue, wake_channel
from celery_serve._wire.connections import BLOCK_S
from celery_serve.workers.replica import Replica
from celery_serve.workers.replica_redis import QueueOps, Token

logger = logging.getLogger(__name__)

_HOLDER_BLOCK_S = 0.2  # a replica holding models blocks at most this long (covers a wake lost in a race),
# shorter than the default fallback wait, so a lost wake-up is caught by the holder before another replica steals


def fallback_s() -> float:
    return float(os.environ.get("SERVE_MULTIPLEX_FALLBACK_S", "0.5"))


class AffinityTaker:
    """`take(limit, block_s)` with `QueueOps.take`'s contract, in the order above."""

    def __init__(self, ops: QueueOps, replica: Replica, wait_s: float | None = None) -> None:
        self.ops = ops
        self.replica = replica
        self.wait_s = fallback_s() if wait_s is None else wait_s
        self.index = model_index(ops.queue)
        self.channel = wake_channel(ops.queue)
        self.timeout_s = float(replica.spec.config.get("request_timeout_s") or 60)
        self._blocking_id: int | None = None
        self._blocked = False
        self._woken = False
        self._listener: asyncio.Task[None] | None = None

    async def take(self, limit: int, block_s: float) -> list[tuple[Token, bytes]]:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.create_task(self._listen())
        try:
            return await self._take(limit, block_s)
        except BaseException:
            self._blocking_id = None  # the connections may be reset: ask the blocking one its id again
            raise

    async def _take(self, limit: int, block_s: float) -> list[tuple[Token, bytes]]:
        deadline = time.monotonic() + block_s
        while True:
            self._woken = False
            items = await self._take_now(limit)
            if items:
                return items
            remaining = deadline - time.monotonic()
            if remaining < 0.001:  # Redis would read a shorter blocking timeout as 0: "block forever"
                return []
            if self._woken:
                continue
            if self.replica.held_models():
                remaining = min(remaining, _HOLDER_BLOCK_S)
            if self._blocking_id is None:
                self._blocking_id = int(await self.ops.blocking.client_id())
            if self._woken:  # a wake-up came while we asked for the connection id
                continue
            self._blocked = True  # from here a wake-up unblocks the pop below (no await until it is sent)
            try:
                moved = await self.ops.blocking.blmove(
                    self.ops.queue,
                    self.ops.claim,
                    remaining,  # type: ignore[arg-type]  # Redis takes a fractional timeout
                    "RIGHT",
                    "LEFT",
                )
            finally:
                self._blocked = False
            if moved is not None:  # as QueueOps.take: a blocking pop's message is acknowledged by "@" + itself
                moved = moved if isinstance(moved, bytes) else moved.encode()
                return [(b"@" + moved, moved)]

    async def _take_now(self, limit: int) -> list[tuple[Token, bytes]]:
        items: list[tuple[Token, bytes]] = []
        held = self.replica.held_models()
        for model in reversed(held):  # most recently used first
            items += await self.ops._take_now(limit - len(items), model_queue(self.ops.queue, model))
            if len(items) >= limit:
                return items
        if items:
            return items
        items = await self.ops._take_now(limit)
        if items:
            return items
        return await self._steal(limit, set(held))

    async def _steal(self, limit: int, held: set[str]) -> list[tuple[Token, bytes]]:
        """Take from the model queue whose oldest request has waited longest, if past the fallback wait."""
        models = [m.decode() if isinstance(m, bytes) else m for m in await self.ops.redis.smembers(self.index)]
        models = [m for m in models if m not in held]
        if not models:
            return []
        async with self.ops.redis.pipeline(transaction=False) as pipe:
            for model in models:
                pipe.lindex(model_queue(self.ops.queue, model), -1)  # the oldest: queues are taken from the right
            oldest = await pipe.execute()
        now = time.time()
        best, best_age = None, self.wait_s
        for model, raw in zip(models, oldest, strict=True):
            if raw is None:
                continue
            age = self._age(raw, now)
            if age >= best_age:
                best, best_age = model, age
        if best is None:
            return []
        return await self.ops._take_now(limit, model_queue(self.ops.queue, best))

    def _age(self, raw: Any, now: float) -> float:
        """How long a queued request has waited: its deadline minus the deployment's request timeout."""
        try:
            expires = orjson.loads(raw)["headers"].get("expires")
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            return float("inf")  # unreadable: let a replica take it and answer it as such
        if not expires:
            return float("inf")
        return now - (datetime.fromisoformat(expires).timestamp() - self.timeout_s)

    # --- wake-ups ------------------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Follow the wake channel: unblock now for a model held here, after the fallback wait otherwise."""
        loop = asyncio.get_running_loop()
        while True:
            pubsub = self.ops.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                while True:
                    message = await pubsub.get_message(timeout=BLOCK_S)
                    if message is None:
                        continue
                    model = message["data"].decode()
                    if model in self.replica.held_models():
                        await self._wake()
                    else:
                        loop.call_later(self.wait_s, lambda: asyncio.ensure_future(self._wake()))
            except asyncio.CancelledError:
                raise
            except (redis.exceptions.RedisError, OSError) as exc:
                logger.warning("model wake-up listener lost Redis (%s); retrying", exc)
                await asyncio.sleep(0.5)
            finally:
                await pubsub.aclose()

    async def _wake(self) -> None:
        self._woken = True
        if self._blocked and self._blocking_id is not None:
            try:
                await self.ops.redis.client_unblock(self._blocking_id)
            except redis.exceptions.RedisError as exc:
                logger.debug("could not unblock the replica's blocking pop: %s", exc)

    def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
