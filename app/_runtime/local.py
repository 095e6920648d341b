"""`serve.run(app, _local_testing_mode=True)`: the application in the calling process, as Ray documents for
unit tests.

No Redis, no workers, no gateway: each deployment is constructed once here (children first, so a bound
deployment arrives as a handle), and handles call it on one background event loop, with the same semantics
as the distributed handles: `.remote()` returns a `DeploymentResponse` that can be awaited or `.result()`-ed,
responses passed as arguments are awaited first, `handle.method.remote()` and `.options(method_name=...)`
call other methods, `.options(multiplexed_model_id=...)` names a model and `.options(stream=True)` iterates a
generator method. Async methods run on the loop; sync methods (and sync generators' steps) run in threads, at
most `max_ongoing_requests` of a deployment's requests at once (as on a replica). HTTP is not served.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import uuid
from typing import Any

from celery_serve._runtime.context import BackgroundLoop
from celery_serve.application import Application, Pipeline, flatten, name_of, replace_applications
from celery_serve.exceptions import DeploymentConfigError, DeploymentNotFoundError
from celery_serve.handle import _END, DeploymentHandle, DeploymentResponse, DeploymentResponseGenerator, _resolve
from celery_serve.multiplex import set_multiplexed_model_id

logger = logging.getLogger(__name__)

_lock = threading.Lock()
_loop: BackgroundLoop | None = None
_apps: dict[str, dict[str, _LocalReplica]] = {}


class _LocalReplica:
    """One deployment's only replica, in this process."""

    def __init__(self, app: str, name: str, target: Any, instance: Any, max_ongoing: int) -> None:
        self.app = app
        self.name = name
        self.target = target
        self.instance = instance
        self.max_ongoing = max_ongoing
        self._limit: asyncio.Semaphore | None = None

    def method(self, name: str) -> Any:
        if self.instance is None:
            if name != "__call__":
                raise DeploymentNotFoundError(f"function deployment '{self.name}' has only __call__, not '{name}'")
            return self.target
        call = getattr(self.instance, name, None) if (name == "__call__" or not name.startswith("_")) else None
        if not callable(call):
            raise DeploymentNotFoundError(f"deployment '{self.name}' has no method '{name}'")
        return call

    async def call(
        self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any], model_id: str = "", stream: bool = False
    ) -> Any:
        """Run one call; with `stream` the opened `_LocalStream` (the generator runs as it is iterated)."""
        from celery_serve.workers.streaming import usage_error

        set_multiplexed_model_id(model_id)  # this task's own context: seen by this request only
        args = tuple([await _resolve(a) for a in args])
        kwargs = {k: await _resolve(v) for k, v in kwargs.items()}
        func = self.method(method)
        if self._limit is None:
            self._limit = asyncio.Semaphore(self.max_ongoing)
        async with self._limit:
            if inspect.iscoroutinefunction(func) or inspect.isasyncgenfunction(func):
                value = func(*args, **kwargs)
            else:
                value = await asyncio.to_thread(func, *args, **kwargs)  # copies the context: the model id too
            if inspect.isawaitable(value):
                value = await value
        error = usage_error(f"'{self.name}.{method}'", method, value, asked=stream)
        if error is not None:
            if inspect.isgenerator(value):
                value.close()
            elif inspect.isasyncgen(value):
                await value.aclose()
            raise error
        return _LocalStream(value) if stream else value


class _LocalStream:
    """A generator method's stream in local testing mode: what `DeploymentResponseGenerator` iterates."""

    def __init__(self, generator: Any) -> None:
        self.job_id = str(uuid.uuid4())
        self.generator = generator

    async def next(self) -> Any:
        if inspect.isasyncgen(self.generator):
            try:
                return await self.generator.__anext__()
            except StopAsyncIteration:
                return _END
        return await asyncio.to_thread(next, self.generator, _END)  # a sync step may block: not on the loop

    async def cancel(self) -> None:
        if inspect.isasyncgen(self.generator):
            await self.generator.aclose()
        else:
            self.generator.close()


class LocalDeploymentHandle(DeploymentHandle):
    """A handle to a deployment running in this process (local testing mode)."""

    def options(
        self,
        *,
        method_name: str | None = None,
        multiplexed_model_id: str | None = None,
        stream: bool | None = None,
    ) -> LocalDeploymentHandle:
        return LocalDeploymentHandle(
            self.deployment_name,
            self.app_name,
            method_name=method_name or self.method_name,
            multiplexed_model_id=self.multiplexed_model_id if multiplexed_model_id is None else multiplexed_model_id,
            stream=self.stream if stream is None else stream,
        )

    def remote(self, *args: Any, **kwargs: Any) -> DeploymentResponse | DeploymentResponseGenerator:
        replica = _apps.get(self.app_name, {}).get(self.deployment_name)
        loop = _loop
        if replica is None or loop is None:
            raise DeploymentNotFoundError(
                f"application '{self.app_name}' is not running in local testing mode (was serve.shutdown() called?)"
            )
        future = loop.run(replica.call(self.method_name, args, kwargs, self.multiplexed_model_id, self.stream))
        if self.stream:
            return DeploymentResponseGenerator(loop, future, self.deployment_name)
        return DeploymentResponse(future, self.deployment_name)

    def __reduce__(self) -> tuple[Any, ...]:
        raise DeploymentConfigError("a local-testing-mode handle cannot leave its process")


def run_local(target: Application, name: str) -> LocalDeploymentHandle:
    """Construct every deployment of `target` in this process and return the ingress handle."""
    global _loop
    if isinstance(target, Pipeline) or not isinstance(target, Application):
        raise DeploymentConfigError(
            f"local testing mode runs an application built with .bind(), got {type(target).__name__}"
        )
    graph = flatten(target)
    with _lock:
        if _loop is None:
            _loop = BackgroundLoop("celery-serve-local")
        loop = _loop
    _apps.pop(name, None)
    replicas: dict[str, _LocalReplica] = {}

    def to_handle(child: Application) -> LocalDeploymentHandle:
        return LocalDeploymentHandle(name_of(graph, child), name)

    for dep_name, node in graph.items():  # children come first: their handles work while parents construct
        config = node.deployment.config
        cls = node.deployment.func_or_class
        args = replace_applications(list(node.args), to_handle)
        kwargs = replace_applications(dict(node.kwargs), to_handle)
        instance = loop.run_sync(_construct(cls, args, kwargs, config.user_config)) if inspect.isclass(cls) else None
        replicas[dep_name] = _LocalReplica(name, dep_name, cls, instance, int(config.max_ongoing_requests or 100))
        _apps[name] = replicas
    logger.info("application '%s' runs in local testing mode (%d deployments)", name, len(replicas))
    return LocalDeploymentHandle(name_of(graph, target), name)


async def _construct(cls: type, args: list[Any], kwargs: dict[str, Any], user_config: Any) -> Any:
    """Construct on the local loop, so that an instance's event-loop objects belong to the loop it runs on."""
    instance = cls(*args, **kwargs)
    reconfigure = getattr(instance, "reconfigure", None)
    if user_config is not None and callable(reconfigure):
        result = reconfigure(user_config)
        if inspect.isawaitable(result):
            await result
    return instance


def shutdown_local() -> None:
    """Forget every local application and stop the local loop."""
    global _loop
    with _lock:
        _apps.clear()
        loop, _loop = _loop, None
    if loop is not None:
        try:
            loop.run(_cancel_all()).result(timeout=5)
        except Exception as exc:  # noqa: BLE001 - stopping anyway
            logger.debug("local loop did not wind down cleanly: %s", exc)
        loop.stop()


async def _cancel_all() -> None:
    """Cancel what still runs on the local loop (batch queues, requests nobody waits for), and let it end."""
    current = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
