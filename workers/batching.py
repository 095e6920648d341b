"""The batching core: which requests run together, how long to wait for company, who gets what back.

Plain Python, no Redis and no Celery, so every rule is unit-tested in microseconds; `celery_serve._batch_queue`
runs batches with it (for the consumer's drained requests and for in-replica calls alike).

Rules:
- Items whose deadline passed, or that were cancelled, are dropped before the batch runs.
- A batch holds items of one shape (same number of positional arguments, same keyword names), in
  arrival order, at most `max_batch_size` of them (or of `batch_size_fn`'s measure).
- The function receives one list per argument (the common case: one list of items) and must return a
  sequence of the same length (list, tuple, numpy array, tensor). If it raises, every item gets that error;
  another length, a string, bytes or a mapping fails every item with an error naming the method and both
  lengths; an exception instance in the sequence fails only its item.
- Waiting for company is adaptive: a replica waits up to `batch_wait_timeout_s` for more items only when
  requests have lately been arriving fast enough that one more is expected within that window; otherwise
  a lone request runs at once.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from celery_serve.exceptions import ServeError
from celery_serve.workers.generators import BatchStream

K = TypeVar("K")


class BatchSizeMismatchError(ServeError):
    """A batched function returned a different number of results than it was given items."""


@dataclass
class Item(Generic[K]):
    """One caller's request waiting for a batch; `key` is whatever the caller uses to answer it."""

    key: K
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    deadline: float | None = None
    cancelled: bool = False

    @property
    def shape(self) -> tuple[int, tuple[str, ...]]:
        return len(self.args), tuple(sorted(self.kwargs))


@dataclass
class Outcome:
    """What one item gets back: a value, or an error."""

    value: Any = None
    error: BaseException | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def drop_stale(
    items: Sequence[Item[K]], now: float | None = None
) -> tuple[list[Item[K]], list[Item[K]], list[Item[K]]]:
    """Split into (live, expired, cancelled)."""
    now = time.time() if now is None else now
    live: list[Item[K]] = []
    expired: list[Item[K]] = []
    cancelled: list[Item[K]] = []
    for item in items:
        if item.cancelled:
            cancelled.append(item)
        elif item.deadline is not None and now > item.deadline:
            expired.append(item)
        else:
            live.append(item)
    return live, expired, cancelled


def form_batches(items: Sequence[Item[K]], max_batch_size: int) -> list[list[Item[K]]]:
    """Group items by shape, keeping arrival order within each group, in chunks of `max_batch_size`."""
    groups: dict[tuple[int, tuple[str, ...]], list[Item[K]]] = {}
    for item in items:
        groups.setdefault(item.shape, []).append(item)
    batches: list[list[Item[K]]] = []
    for group in groups.values():
        for start in range(0, len(group), max_batch_size):
            batches.append(group[start : start + max_batch_size])
    return batches


def batch_arguments(batch: Sequence[Item[Any]]) -> tuple[list[Any], dict[str, list[Any]]]:
    """The call for a batch: one list per positional argument and per keyword."""
    nargs, names = batch[0].shape
    args = [[item.args[i] for item in batch] for i in range(nargs)]
    kwargs = {name: [item.kwargs[name] for item in batch] for name in names}
    return args, kwargs


def distribute(batch: Sequence[Item[Any]], results: Any, name: str = "") -> list[Outcome]:
    """Match a batched function's return value to its items, applying the failure rules.

    Any sequence of the batch's length is accepted: a list, a tuple, a numpy array or a torch tensor (split
    along its first axis). A string, bytes or a mapping is refused even when its length matches: splitting
    one would hand each caller a character or a key, which is never what the function meant."""
    if isinstance(results, BaseException):
        return [Outcome(error=results) for _ in batch]
    what = f"@batch method '{name}'" if name else "a @batch function"
    if (
        isinstance(results, (str, bytes, bytearray, Mapping))
        or not hasattr(results, "__len__")
        or not hasattr(results, "__getitem__")
    ):
        error = BatchSizeMismatchError(
            f"{what} must return one result per item (a list, tuple, numpy array or tensor); it got "
            f"{len(batch)} items and returned {type(results).__name__}"
        )
        return [Outcome(error=error) for _ in batch]
    try:
        length = len(results)
    except TypeError:  # e.g. a 0-d numpy array or tensor
        length = -1
    if length != len(batch):
        returned = f"{length} results" if length >= 0 else f"a {type(results).__name__} without a length"
        error = BatchSizeMismatchError(
            f"{what} must return one result per item: it got {len(batch)} items and returned {returned}"
        )
        return [Outcome(error=error) for _ in batch]
    outcomes = []
    for i in range(length):
        value = results[i]
        outcomes.append(Outcome(error=value) if isinstance(value, BaseException) else Outcome(value=value))
    return outcomes


def form_sized_batches(
    items: Sequence[Item[K]], max_batch_size: int, size_fn: Callable[[list[Any]], int] | None = None
) -> tuple[list[list[Item[K]]], list[tuple[Item[K], BaseException]]]:
    """Batches as `form_batches` makes them, measured by `size_fn` (Ray's `batch_size_fn`) when given.

    `size_fn` gets the list of each item's first argument and returns the batch's size; a batch grows while
    its size stays within `max_batch_size`. An item too big to fit even alone is returned with its error
    (it cannot run in any batch), as is every item of a group whose `size_fn` raised."""
    if size_fn is None:
        return form_batches(items, max_batch_size), []
    failed: list[tuple[Item[K], BaseException]] = []
    batches: list[list[Item[K]]] = []
    for group in form_batches(items, len(items) or 1):
        current: list[Item[K]] = []
        for item in group:
            try:
                alone = int(size_fn([_first(item)]))
                together = int(size_fn([_first(i) for i in [*current, item]])) if current else alone
            except Exception as exc:  # noqa: BLE001 - the user's size function failed: its items fail
                failed.append((item, exc))
                continue
            if alone > max_batch_size:
                failed.append(
                    (
                        item,
                        BatchSizeMismatchError(
                            f"this request's size is {alone} by batch_size_fn, more than max_batch_size "
                            f"({max_batch_size}): it cannot fit in any batch; split it or raise max_batch_size"
                        ),
                    )
                )
                continue
            if current and together > max_batch_size:
                batches.append(current)
                current = []
            current.append(item)
        if current:
            batches.append(current)
    return batches, failed


def _first(item: Item[Any]) -> Any:
    if item.args:
        return item.args[0]
    return next(iter(item.kwargs.values()), None)


def run_batch(func: Callable[..., Any], batch: Sequence[Item[Any]], name: str = "") -> list[Outcome]:
    """Call a synchronous batched function once for the batch."""
    args, kwargs = batch_arguments(batch)
    try:
        results = func(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - the rule: every item gets the error
        return [Outcome(error=exc) for _ in batch]
    if inspect.isasyncgen(results) or inspect.isgenerator(results):  # batched streaming: a stream per item
        return [Outcome(value=stream) for stream in BatchStream(results, len(batch)).streams()]
    return distribute(batch, results, name)


async def run_batch_async(func: Callable[..., Any], batch: Sequence[Item[Any]], name: str = "") -> list[Outcome]:
    """Call a batched function (async, or sync returning an awaitable) once for the batch."""
    args, kwargs = batch_arguments(batch)
    try:
        results = func(*args, **kwargs)
        if inspect.isawaitable(results):
            results = await results
    except Exception as exc:  # noqa: BLE001 - the rule: every item gets the error
        return [Outcome(error=exc) for _ in batch]
    if inspect.isasyncgen(results) or inspect.isgenerator(results):  # batched streaming: a stream per item
        return [Outcome(value=stream) for stream in BatchStream(results, len(batch)).streams()]
    return distribute(batch, results, name)


class ArrivalRate:
    """Recent request arrival rate (per second), from how many items each take found and when."""

    def __init__(self, half_life_s: float = 0.25) -> None:
        self.half_life_s = half_life_s
        self.rate = 0.0
        self._last: float | None = None

    def observe(self, count: int, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if self._last is None:
            self._last = now
            return
        elapsed = max(now - self._last, 1e-6)
        self._last = now
        weight = 0.5 ** (elapsed / self.half_life_s)
        self.rate = weight * self.rate + (1 - weight) * (count / elapsed)

    def expect_more_within(self, window_s: float) -> bool:
        """Is at least one more arrival expected within `window_s`?"""
        return window_s > 0 and self.rate * window_s >= 1.0


def wait_budget(have: int, max_batch_size: int, window_s: float, rate: ArrivalRate) -> float:
    """How long to wait for more items: 0 when the batch is full or company is not expected."""
    if have >= max_batch_size or not rate.expect_more_within(window_s):
        return 0.0
    return window_s
