"""What a `@batch` function does at run time: form batches, run them (at most `max_concurrent_batches` at once),
and give each caller its own result.

Batches come from two places, one set of rules:
- the replica's consumer drains its Redis queue and hands every waiting request for a batched method over at
  once (`Batcher.run_items`): requests that arrived together are taken in one round trip;
- a batched method called from inside the replica (`await self.process(x)`, Ray's usual pattern) puts its one
  item in an in-process queue (`Batcher.submit`); concurrent calls are batched together, waiting at most
  `batch_wait_timeout_s` for a full batch, exactly as Ray's `_BatchQueue` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from celery_serve.exceptions import DeploymentConfigError
from celery_serve.multiplex import get_multiplexed_model_id, set_multiplexed_model_id
from celery_serve.workers.batching import Item, Outcome, drop_stale, form_sized_batches, run_batch_async

SizeFn = Callable[[list[Any]], int]


def check_max_batch_size(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DeploymentConfigError(f"max_batch_size must be an integer >= 1, got {value!r}")
    return value


def check_batch_wait_timeout_s(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise DeploymentConfigError(f"batch_wait_timeout_s must be a number >= 0, got {value!r}")
    return float(value)


def check_max_concurrent_batches(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DeploymentConfigError(f"max_concurrent_batches must be an integer >= 1, got {value!r}")
    return value


class Batcher:
    """The batching state of one decorated function: its options (changeable at run time) and its queues.

    Options are per function, as in Ray (`self.__call__.set_max_batch_size(n)` changes them for the
    replica); queues and the concurrency limit are per instance (per replica), kept on the instance."""

    def __init__(
        self,
        func: Callable[..., Any],
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_concurrent_batches: int,
        batch_size_fn: SizeFn | None,
    ) -> None:
        self.func = func
        self.name = func.__qualname__
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.max_concurrent_batches = max_concurrent_batches
        self.batch_size_fn = batch_size_fn
        parts = func.__qualname__.split(".")
        self.is_method = len(parts) > 1 and parts[-2] != "<locals>"
        self._attr = f"__serve_batch_state_{func.__name__}"

    # --- Ray's setters and getters ---------------------------------------------------------------------

    def set_max_batch_size(self, new_max_batch_size: int) -> None:
        """Change the largest batch from now on (e.g. in `reconfigure`, from `user_config`)."""
        self.max_batch_size = check_max_batch_size(new_max_batch_size)

    def set_batch_wait_timeout_s(self, new_batch_wait_timeout_s: float) -> None:
        """Change how long a partial batch waits for company from now on."""
        self.batch_wait_timeout_s = check_batch_wait_timeout_s(new_batch_wait_timeout_s)

    def get_max_batch_size(self) -> int:
        return self.max_batch_size

    def get_batch_wait_timeout_s(self) -> float:
        return self.batch_wait_timeout_s

    # --- running ---------------------------------------------------------------------------------------

    def bound(self, owner: Any) -> Callable[..., Any]:
        """The user's function, bound to its instance when it is a method."""
        return self.func.__get__(owner) if owner is not None else self.func

    def state(self, owner: Any) -> _State:
        holder = owner if owner is not None else self
        found = holder.__dict__.get(self._attr) if hasattr(holder, "__dict__") else None
        if found is None:
            found = _State()
            try:
                setattr(holder, self._attr, found)
            except AttributeError:  # __slots__ without room: one state per function instead
                found = self.__dict__.setdefault(self._attr, found)
        return found

    async def run_items(self, owner: Any, items: list[Item[Any]]) -> list[Outcome]:
        """Run items that are all here now (the consumer's path); outcomes in the items' order."""
        outcomes: dict[int, Outcome] = {}
        indexed = [Item(i, it.args, it.kwargs, it.deadline, it.cancelled) for i, it in enumerate(items)]
        batches, failed = form_sized_batches(indexed, self.max_batch_size, self.batch_size_fn)
        for item, error in failed:
            outcomes[item.key] = Outcome(error=error)
        state = self.state(owner)

        async def one(batch: list[Item[int]]) -> None:
            async with state.semaphore(self.max_concurrent_batches):
                results = await run_batch_async(self.bound(owner), batch, self.name)
            for item, outcome in zip(batch, results, strict=True):
                outcomes[item.key] = outcome

        await asyncio.gather(*(one(b) for b in batches))
        return [outcomes[i] for i in range(len(items))]

    async def submit(self, owner: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """One caller's item through the in-process queue; returns its own result or raises its error."""
        loop = asyncio.get_running_loop()
        # one queue per multiplexed model, as in Ray: a batch's requests are all for the same model
        queue = self.state(owner).queue(self, owner, loop, get_multiplexed_model_id())
        future: asyncio.Future[Any] = loop.create_future()
        queue.put(Item(future, args, kwargs), future)
        return await future


class _State:
    """One instance's batching state: its concurrency limit and its in-process queue, per event loop."""

    def __init__(self) -> None:
        self._semaphores: dict[int, tuple[int, asyncio.Semaphore]] = {}
        self._queues: dict[tuple[int, str], _BatchQueue] = {}

    def semaphore(self, limit: int) -> asyncio.Semaphore:
        key = id(asyncio.get_running_loop())
        found = self._semaphores.get(key)
        if found is None or found[0] != limit:
            found = self._semaphores[key] = (limit, asyncio.Semaphore(limit))
        return found[1]

    def queue(self, batcher: Batcher, owner: Any, loop: asyncio.AbstractEventLoop, model_id: str = "") -> _BatchQueue:
        key = (id(loop), model_id)
        found = self._queues.get(key)
        if found is None or found.loop is not loop or found.task.done():
            found = self._queues[key] = _BatchQueue(batcher, owner, self, loop, model_id)
        return found


class _BatchQueue:
    """Single items in, batches out: a batch runs when it is full or `batch_wait_timeout_s` after its first
    item arrived, whichever comes first; the next batch forms while this one runs when
    `max_concurrent_batches` allows it, otherwise as soon as it has finished."""

    def __init__(
        self, batcher: Batcher, owner: Any, state: _State, loop: asyncio.AbstractEventLoop, model_id: str = ""
    ) -> None:
        self.batcher = batcher
        self.model_id = model_id
        self.owner = owner
        self.state = state
        self.loop = loop
        self.pending: list[tuple[Item[Any], asyncio.Future[Any]]] = []
        self.arrived = asyncio.Event()
        self.running: set[asyncio.Task[None]] = set()
        self.task = loop.create_task(self._serve(), name=f"serve-batch-{batcher.name}")

    def put(self, item: Item[Any], future: asyncio.Future[Any]) -> None:
        self.pending.append((item, future))
        self.arrived.set()

    def _full(self) -> bool:
        size_fn = self.batcher.batch_size_fn
        if size_fn is None:
            return len(self.pending) >= self.batcher.max_batch_size
        try:
            firsts = [i.args[0] if i.args else next(iter(i.kwargs.values()), None) for i, _ in self.pending]
            return int(size_fn(firsts)) >= self.batcher.max_batch_size
        except Exception:  # noqa: BLE001 - the error reaches the callers when the batch is formed
            return True

    async def _serve(self) -> None:
        while True:
            while not self.pending:
                self.arrived.clear()
                await self.arrived.wait()
            semaphore = self.state.semaphore(self.batcher.max_concurrent_batches)
            await semaphore.acquire()
            try:
                deadline = self.loop.time() + self.batcher.batch_wait_timeout_s
                while not self._full() and (remaining := deadline - self.loop.time()) > 0:
                    self.arrived.clear()
                    try:
                        await asyncio.wait_for(self.arrived.wait(), remaining)
                    except TimeoutError:
                        break
                batch = self._take()
            except BaseException:
                semaphore.release()
                raise
            if not batch:
                semaphore.release()
                continue
            task = self.loop.create_task(self._run(batch))
            self.running.add(task)
            task.add_done_callback(self.running.discard)
            task.add_done_callback(lambda _t, s=semaphore: s.release())  # type: ignore[misc]

    def _take(self) -> list[tuple[Item[Any], asyncio.Future[Any]]]:
        """The next batch from what is pending (arrival order, one shape); too-big items fail here."""
        for item, future in self.pending:
            item.cancelled = future.done()  # a caller who stopped waiting is not run
        live, _, cancelled = drop_stale([item for item, _ in self.pending])
        futures = {id(item): future for item, future in self.pending}
        batches, failed = form_sized_batches(live, self.batcher.max_batch_size, self.batcher.batch_size_fn)
        for item, error in failed:
            _settle(futures[id(item)], Outcome(error=error))
        taken = batches[0] if batches else []
        gone = {id(i) for i in taken} | {id(i) for i, _ in failed} | {id(i) for i in cancelled}
        self.pending = [(i, f) for i, f in self.pending if id(i) not in gone]
        return [(item, futures[id(item)]) for item in taken]

    async def _run(self, batch: list[tuple[Item[Any], asyncio.Future[Any]]]) -> None:
        set_multiplexed_model_id(self.model_id)  # this task's context: the batch's model
        items = [item for item, _ in batch]
        try:
            outcomes = await run_batch_async(self.batcher.bound(self.owner), items, self.batcher.name)
        except BaseException as exc:  # cancelled while running: every caller hears it
            outcomes = [Outcome(error=exc) for _ in items]
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                _settle(future, outcome)
            raise
        for (_, future), outcome in zip(batch, outcomes, strict=True):
            _settle(future, outcome)


def _settle(future: asyncio.Future[Any], outcome: Outcome) -> None:
    if future.done():
        return
    if isinstance(outcome.error, asyncio.CancelledError):
        future.cancel()
    elif outcome.error is not None:
        future.set_exception(outcome.error)
    else:
        future.set_result(outcome.value)
