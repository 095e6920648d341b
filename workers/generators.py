"""Iterating user generators from a replica's event loop: a sync generator's steps run on worker threads
(a step may block), and one `@batch` generator call is split into a stream per caller.

Apart from `celery_serve.workers.streaming` (which writes streams to Redis) so that `batching` can split a
batched generator without importing the streaming machinery, and without an import cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from celery_serve.exceptions import StreamUsageError

logger = logging.getLogger(__name__)

INFLIGHT = 32  # items produced but not yet taken (written to Redis, or read by a caller), at most
_DONE = object()


async def sync_items(gen: Iterator[Any]) -> AsyncIterator[Any]:
    """A sync iterator's items, each computed on a worker thread; closed on the way out."""
    try:
        while True:
            item = await asyncio.to_thread(next, gen, _DONE)
            if item is _DONE:
                return
            yield item
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            try:
                close()
            except ValueError:  # still running on its thread (cancelled mid-step): it ends with that step
                logger.debug("generator still running on its thread when its stream was stopped")


class BatchStream:
    """One `@batch` generator call shared by the callers of a batch, as in Ray's batched streaming: each
    step yields a list with one item per caller; `StopIteration` in a caller's place ends that caller's
    stream (the others go on). A caller who goes away is skipped; when all have, the generator is closed."""

    def __init__(self, gen: Any, size: int) -> None:
        self.gen = gen if inspect.isasyncgen(gen) else sync_items(gen)
        self.size = size
        self.queues: list[asyncio.Queue[Any]] = [asyncio.Queue(maxsize=INFLIGHT) for _ in range(size)]
        self.listening = [True] * size
        self.ended = [False] * size
        self.task: asyncio.Task[None] | None = None

    def streams(self) -> list[AsyncIterator[Any]]:
        return [self._items(i) for i in range(self.size)]

    async def _drive(self) -> None:
        error: BaseException | None = None
        try:
            async for step in self.gen:
                if not isinstance(step, (list, tuple)) or len(step) != self.size:
                    got = f"{len(step)} items" if isinstance(step, (list, tuple)) else type(step).__name__
                    raise StreamUsageError(
                        f"a @batch generator must yield a list with one item per request ({self.size}), got {got}"
                    )
                for i, item in enumerate(step):
                    if self.ended[i]:
                        continue
                    if item is StopIteration or isinstance(item, StopIteration):
                        self.ended[i] = True
                        await self.queues[i].put(_DONE)
                    elif self.listening[i]:
                        await self.queues[i].put(item)
                if all(e or not listening for e, listening in zip(self.ended, self.listening, strict=True)):
                    break
        except Exception as exc:  # noqa: BLE001 - every caller still streaming gets the error
            error = exc
        finally:
            for i in range(self.size):
                if not self.ended[i] and self.listening[i]:
                    self.ended[i] = True
                    await self.queues[i].put(error if error is not None else _DONE)
            with contextlib.suppress(BaseException):
                await self.gen.aclose()  # type: ignore[attr-defined]

    async def _items(self, i: int) -> AsyncIterator[Any]:
        if self.task is None:
            self.task = asyncio.create_task(self._drive(), name="batched stream")
        try:
            while True:
                item = await self.queues[i].get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.listening[i] = False
            while not self.queues[i].empty():
                self.queues[i].get_nowait()
            if not any(self.listening) and not self.task.done():
                self.task.cancel()
