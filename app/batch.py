"""`@batch`: a method that takes lists and returns one result per item, called by each caller with one item.

    @deployment
    class TokenBatcher:
        @batch(max_batch_size=512, batch_wait_timeout_s=0.1,
               batch_size_fn=lambda seqs: sum(len(s.split()) for s in seqs))
        async def process(self, sequences: list[str]) -> list[int]:
            return [len(s.split()) for s in sequences]

        async def __call__(self, sequence: str) -> int:
            return await self.process(sequence)       # batched across concurrent calls, as in Ray

Callers (HTTP, handles, the client, or another method of the same replica) pass one item and get their own
result back. When the batched method is what the request calls, the replica builds the batches from its
queue: when it becomes free it takes every waiting request for the method, up to `max_batch_size`, in one
Redis round trip, and waits at most `batch_wait_timeout_s` for more when fewer are there. When another method
calls it (`await self.process(x)`), concurrent calls meet in an in-process queue, as in Ray.

Options, as in Ray: `max_batch_size`, `batch_wait_timeout_s`, `max_concurrent_batches` (batches of an async
function running at once in one replica) and `batch_size_fn` (the size of a batch, e.g. its total tokens;
a batch grows while that stays within `max_batch_size`). `self.method.set_max_batch_size(n)` and
`.set_batch_wait_timeout_s(s)` change them while the replica runs (e.g. in `reconfigure`).

Failure rules: if the function raises, every caller in the batch gets that error; the return value may be
any sequence of the batch's length (list, tuple, numpy array, torch tensor along its first axis); any other
length or a non-sequence fails every caller with an error naming the method and both lengths; an exception
instance in the returned sequence fails only that caller.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from celery_serve._batch_queue import (
    Batcher,
    SizeFn,
    check_batch_wait_timeout_s,
    check_max_batch_size,
    check_max_concurrent_batches,
)
from celery_serve.exceptions import DeploymentConfigError

F = TypeVar("F", bound=Callable[..., Any])

BATCH_ATTR = "__serve_batch__"
DEFAULT_MAX_BATCH_SIZE = 10
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.002
DEFAULT_MAX_CONCURRENT_BATCHES = 1


@dataclass(frozen=True)
class BatchConfig:
    """A batched function's options as they are now."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S
    max_concurrent_batches: int = DEFAULT_MAX_CONCURRENT_BATCHES
    batch_size_fn: SizeFn | None = None


@overload
def batch(_func: F) -> F: ...


@overload
def batch(
    _func: None = None,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S,
    max_concurrent_batches: int = DEFAULT_MAX_CONCURRENT_BATCHES,
    batch_size_fn: SizeFn | None = None,
) -> Callable[[F], F]: ...


def batch(
    _func: Any = None,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S,
    max_concurrent_batches: int = DEFAULT_MAX_CONCURRENT_BATCHES,
    batch_size_fn: SizeFn | None = None,
) -> Any:
    """Make a function or method (sync or async) batched; works bare (`@batch`) or with options.

    The decorated function, called with one item, is a coroutine function returning that item's result."""
    size = check_max_batch_size(max_batch_size)
    wait = check_batch_wait_timeout_s(batch_wait_timeout_s)
    concurrent = check_max_concurrent_batches(max_concurrent_batches)
    if batch_size_fn is not None and not callable(batch_size_fn):
        raise DeploymentConfigError(
            f"batch_size_fn must be a function from the list of items to an int, got {batch_size_fn!r}"
        )

    def mark(func: F) -> F:
        if not callable(func):
            raise DeploymentConfigError(f"@batch goes on a function or method, got {func!r}")
        if getattr(func, BATCH_ATTR, None) is not None:
            raise DeploymentConfigError(f"@batch is applied twice to {func.__qualname__}")
        batcher = Batcher(func, size, wait, concurrent, batch_size_fn)

        @functools.wraps(func)
        async def batched(*args: Any, **kwargs: Any) -> Any:
            owner = None
            if batcher.is_method:
                if not args:
                    raise TypeError(f"{batcher.name}() is a method: call it on an instance")
                owner, args = args[0], args[1:]
            return await batcher.submit(owner, tuple(args), dict(kwargs))

        wrapper: Any = batched
        setattr(wrapper, BATCH_ATTR, batcher)
        wrapper.set_max_batch_size = batcher.set_max_batch_size
        wrapper.set_batch_wait_timeout_s = batcher.set_batch_wait_timeout_s
        wrapper._get_max_batch_size = batcher.get_max_batch_size
        wrapper._get_batch_wait_timeout_s = batcher.get_batch_wait_timeout_s
        return wrapper  # type: ignore[no-any-return]

    if _func is not None:
        if not callable(_func):
            raise DeploymentConfigError(
                f"@batch takes options as keywords, e.g. @batch(max_batch_size=8); got {_func!r}"
            )
        return mark(_func)
    return mark


def batcher_of(func: Any) -> Batcher | None:
    """The batching state of a `@batch` function or bound method, or None when it is not batched."""
    return getattr(getattr(func, "__func__", func), BATCH_ATTR, None)


def batch_config(func: Any) -> BatchConfig | None:
    """The `@batch` options of a function or bound method as they are now, or None when it is not batched."""
    found = batcher_of(func)
    if found is None:
        return None
    return BatchConfig(
        found.max_batch_size, found.batch_wait_timeout_s, found.max_concurrent_batches, found.batch_size_fn
    )
