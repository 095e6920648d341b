"""Model multiplexing, as in Ray Serve: many models behind one deployment, a few loaded per replica.

    @deployment
    class ModelInferencer:
        @multiplexed(max_num_models_per_replica=3)
        async def get_model(self, model_id: str):
            return await load(model_id)

        async def __call__(self, request):
            model = await self.get_model(get_multiplexed_model_id())
            return model.predict(await request.json())

A caller names the model with the `serve_multiplexed_model_id` HTTP header or
`handle.options(multiplexed_model_id="m1")`. Each replica keeps at most `max_num_models_per_replica` models
and unloads the least recently used one to make room (calling its `__del__`, awaited when async, as Ray
does). Requests for a model go preferably to a replica that already holds it: they wait on a per-model queue
that the replicas holding the model take from first; any replica takes them after a short wait (see
`celery_serve._wire.affinity`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar, overload

from celery_serve.exceptions import DeploymentConfigError

logger = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])

MULTIPLEX_ATTR = "__serve_multiplexed__"
DEFAULT_MAX_MODELS = 3

_model_id: contextvars.ContextVar[str] = contextvars.ContextVar("serve_multiplexed_model_id", default="")


def get_multiplexed_model_id() -> str:
    """The model id the current request asked for ('' when it named none)."""
    return _model_id.get()


def set_multiplexed_model_id(model_id: str) -> contextvars.Token[str]:
    """Set for the request being run (the replica does this); returns the token to reset it."""
    return _model_id.set(model_id or "")


def reset_multiplexed_model_id(token: contextvars.Token[str]) -> None:
    _model_id.reset(token)


class ModelCache:
    """One replica's loaded models for one `@multiplexed` loader: least recently used first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.models: OrderedDict[str, Any] = OrderedDict()
        self.loading: dict[str, asyncio.Task[Any]] = {}
        self.loads = 0
        self.unloads = 0

    def held(self) -> list[str]:
        """Loaded models (least recently used first), then those being loaded."""
        return [*self.models, *self.loading]

    async def get(self, model_id: str, load: Callable[[], Any]) -> Any:
        if model_id in self.models:
            self.models.move_to_end(model_id)
            return self.models[model_id]
        task = self.loading.get(model_id)
        if task is None:  # one load per model, however many requests wait for it
            while self.capacity > 0 and len(self.models) + len(self.loading) >= self.capacity and self.models:
                await self._unload_lru()
            task = asyncio.ensure_future(load())
            self.loading[model_id] = task
            try:
                model = await task
            finally:
                self.loading.pop(model_id, None)
            self.models[model_id] = model
            self.loads += 1
            logger.info("loaded model %r (%d held)", model_id, len(self.models))
            return model
        return await asyncio.shield(task)

    async def _unload_lru(self) -> None:
        model_id, model = self.models.popitem(last=False)
        self.unloads += 1
        logger.info("unloading model %r (least recently used)", model_id)
        unload = getattr(type(model), "__del__", None)
        if unload is None:
            return
        try:
            result = unload(model)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # noqa: BLE001 - a failing unload must not fail the request that needs room
            logger.warning("unloading model %r raised %s: %s", model_id, type(exc).__name__, exc)


@overload
def multiplexed(func: F) -> F: ...


@overload
def multiplexed(func: None = None, *, max_num_models_per_replica: int = DEFAULT_MAX_MODELS) -> Callable[[F], F]: ...


def multiplexed(func: Any = None, *, max_num_models_per_replica: int = DEFAULT_MAX_MODELS) -> Any:
    """Make an async `model_id -> model` loader a per-replica LRU cache of models (Ray's `@serve.multiplexed`).

    `max_num_models_per_replica` is how many models one replica keeps loaded (-1: no limit)."""
    limit = max_num_models_per_replica
    if isinstance(limit, bool) or not isinstance(limit, int) or (limit < 1 and limit != -1):
        raise DeploymentConfigError(
            f"max_num_models_per_replica must be an integer >= 1 (or -1 for no limit), got {limit!r}"
        )

    def decorate(loader: F) -> F:
        if not inspect.iscoroutinefunction(loader):
            raise DeploymentConfigError(
                f"@multiplexed goes on an async loader, e.g. `async def get_model(self, model_id: str)`; "
                f"{getattr(loader, '__qualname__', loader)!r} is not async"
            )
        parts = loader.__qualname__.split(".")
        is_method = len(parts) > 1 and parts[-2] != "<locals>"
        attr = f"__serve_models_{loader.__name__}"
        shared: dict[str, ModelCache] = {}

        @functools.wraps(loader)
        async def get_model(*args: Any) -> Any:
            owner = args[0] if is_method and args else None
            rest = args[1:] if owner is not None else args
            if len(rest) != 1 or not isinstance(rest[0], str) or not rest[0]:
                raise DeploymentConfigError(
                    f"{loader.__qualname__}() takes one model id (a non-empty string), got {rest!r}; "
                    "pass serve.get_multiplexed_model_id()"
                )
            cache = cache_of(owner, attr, shared, -1 if limit == -1 else limit)
            return await cache.get(rest[0], functools.partial(loader, *args))

        setattr(get_model, MULTIPLEX_ATTR, attr)
        return get_model  # type: ignore[return-value]

    return decorate(func) if func is not None else decorate


def cache_of(owner: Any, attr: str, shared: dict[str, ModelCache], limit: int) -> ModelCache:
    if owner is None:
        return shared.setdefault(attr, ModelCache(limit if limit > 0 else 0))
    found = owner.__dict__.get(attr)
    if found is None:
        found = ModelCache(limit if limit > 0 else 0)
        setattr(owner, attr, found)
    return found


def model_caches(instance: Any) -> list[ModelCache]:
    """The model caches of a deployment instance (one per `@multiplexed` loader it has used)."""
    if instance is None or not hasattr(instance, "__dict__"):
        return []
    return [v for v in vars(instance).values() if isinstance(v, ModelCache)]


def held_models(instance: Any) -> list[str]:
    return [model for cache in model_caches(instance) for model in cache.held()]
