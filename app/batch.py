"""`@batch`: a method that takes a list and returns a list, called by each caller with one item.

    @deployment
    class Embedder:
        @batch(max_batch_size=32, batch_wait_timeout_s=0.002)
        def __call__(self, texts: list[str]) -> list[list[float]]:
            return self.model.encode(texts).tolist()

Callers (HTTP, handles, the client) send one item and get their own result back. The replica builds the
batches: when it becomes free it takes every waiting request for the method, up to `max_batch_size`, in one
Redis round trip, and waits at most `batch_wait_timeout_s` for more when fewer are there.

Failure rules: if the function raises, every caller in the batch gets that error; if it returns a list of
the wrong length, every caller gets an error naming both lengths; an exception instance in the returned
list fails only that caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, overload

from celery_serve.exceptions import DeploymentConfigError

F = TypeVar("F", bound=Callable[..., Any])

BATCH_ATTR = "__serve_batch__"
DEFAULT_MAX_BATCH_SIZE = 10
DEFAULT_BATCH_WAIT_TIMEOUT_S = 0.002


@dataclass(frozen=True)
class BatchConfig:
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S


@overload
def batch(_func: F) -> F: ...


@overload
def batch(
    _func: None = None,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S,
) -> Callable[[F], F]: ...


def batch(
    _func: Any = None,
    *,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    batch_wait_timeout_s: float = DEFAULT_BATCH_WAIT_TIMEOUT_S,
) -> Any:
    """Mark a method (sync or async) as batched; works bare (`@batch`) or with options."""
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise DeploymentConfigError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    if (
        isinstance(batch_wait_timeout_s, bool)
        or not isinstance(batch_wait_timeout_s, (int, float))
        or batch_wait_timeout_s < 0
    ):
        raise DeploymentConfigError(f"batch_wait_timeout_s must be a number >= 0, got {batch_wait_timeout_s!r}")
    config = BatchConfig(max_batch_size, float(batch_wait_timeout_s))

    def mark(func: F) -> F:
        if not callable(func):
            raise DeploymentConfigError(f"@batch goes on a function or method, got {func!r}")
        setattr(func, BATCH_ATTR, config)
        return func

    if _func is not None:
        if not callable(_func):
            raise DeploymentConfigError(
                f"@batch takes options as keywords, e.g. @batch(max_batch_size=8); got {_func!r}"
            )
        return mark(_func)
    return mark


def batch_config(func: Any) -> BatchConfig | None:
    """The `@batch` options of a function or bound method, or None when it is not batched."""
    return getattr(getattr(func, "__func__", func), BATCH_ATTR, None)
