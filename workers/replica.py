"""One replica of a deployment: the user's class constructed once, and each request turned into a call.

It knows nothing of queues: `handle(envelope)` returns the result record to store. The consumer decides
what to take from Redis and when.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import inspect
import logging
import time
from collections.abc import Callable
from typing import Any

from celery_serve._runtime.spec import AppSpec, is_multiplexed, resolve_deployment
from celery_serve._wire import results as _results
from celery_serve._wire import strictjson
from celery_serve._wire.envelope import Envelope
from celery_serve.batch import BatchConfig, batch_config, batcher_of
from celery_serve.exceptions import DeploymentNotFoundError, ResultNotJSONError, ServeError
from celery_serve.handle import DeploymentHandle
from celery_serve.multiplex import held_models, reset_multiplexed_model_id, set_multiplexed_model_id
from celery_serve.workers.batching import Item, Outcome
from celery_serve.workers.http import ServeRequest, body_of, build_scope, encode_result, to_jsonable
from celery_serve.workers.streaming import run_asgi as run_asgi_streaming

logger = logging.getLogger(__name__)


_INLINE_BELOW_S = 0.0005  # a sync method this fast runs inline: a thread hop would cost more than the call


class _Method:
    __slots__ = ("call", "is_async", "takes_request", "batcher", "owner", "sync_s")

    def __init__(self, call: Callable[..., Any], max_batch_size: int | None = None) -> None:
        self.call = call
        self.batcher = batcher_of(call)
        self.owner = getattr(call, "__self__", None)
        if self.batcher is not None:
            # the consumer calls the user's function with lists; it runs inline when it is sync
            self.is_async = inspect.iscoroutinefunction(self.batcher.func)
            if max_batch_size:  # the deployment's max_batch_size option overrides the decorator's
                self.batcher.set_max_batch_size(max_batch_size)
        else:
            self.is_async = inspect.iscoroutinefunction(call)
        try:
            params = [
                p
                for p in inspect.signature(call).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            ]
        except (TypeError, ValueError):
            params = [None]  # type: ignore[list-item]
        self.takes_request = bool(params)
        self.sync_s: float | None = None  # a sync method's recent run time (moving average), once measured

    @property
    def fast(self) -> bool:
        """A sync method measured to take well under a millisecond: it runs inline, one call at a time."""
        return self.sync_s is not None and self.sync_s < _INLINE_BELOW_S

    def observe(self, seconds: float) -> None:
        self.sync_s = seconds if self.sync_s is None else 0.8 * self.sync_s + 0.2 * seconds

    @property
    def batch(self) -> BatchConfig | None:
        """The `@batch` options as they are now (the user may change them while the replica runs)."""
        return batch_config(self.call) if self.batcher is not None else None


class Replica:
    """The user's deployment, ready to take requests."""

    def __init__(self, spec: AppSpec, deployment: str) -> None:
        self.app = spec
        self.spec = spec.deployments[deployment]
        self.name = deployment
        target, args, kwargs = resolve_deployment(spec, deployment, _make_handle)
        self.target = target
        self.is_function = not inspect.isclass(target)
        self.instance: Any = None if self.is_function else target(*args, **kwargs)
        self.root_path = "" if spec.route_prefix == "/" else spec.route_prefix
        ingress_app = getattr(target, "__serve_ingress_app__", None)
        self.ingress = None
        if ingress_app is not None:  # FastAPI is imported only by replicas that serve a FastAPI ingress
            from celery_serve.workers.ingress import bind_ingress

            self.ingress = bind_ingress(ingress_app, target, self.instance)
        self._methods: dict[str, _Method] = {}
        self._lifespan: Any = None
        self._batched = self._batched_methods()
        self._multiplexed = self.spec.multiplexed or is_multiplexed(target)
        # Sync methods run in threads, as in Ray: up to max_ongoing_requests at once (the consumer takes no
        # more than that); with a cap of 1, or once measured under _INLINE_BELOW_S, they run inline.
        self.max_ongoing = int(self.spec.config.get("max_ongoing_requests") or 100)
        self._threads = (
            concurrent.futures.ThreadPoolExecutor(self.max_ongoing, thread_name_prefix=f"replica-{deployment}")
            if self.max_ongoing > 1
            else None
        )

    @property
    def is_multiplexed(self) -> bool:
        """Does this deployment load models with `@multiplexed` (so its replicas route by model affinity)?"""
        return self._multiplexed

    def held_models(self) -> list[str]:
        """The models this replica holds or is loading now, most recently used last."""
        return held_models(self.instance)

    def runs_concurrently(self, env: Envelope) -> bool:
        """Does this request run beside others (as a task): async code, or sync code in a thread?"""
        if env.http is not None and self.ingress is not None and env.method == "__call__":
            return True
        try:
            method = self.method(env.method)
        except Exception:  # noqa: BLE001 - the error is reported when the request runs
            return False
        return method.is_async or (self._threads is not None and not method.fast)

    async def _call_sync(self, method: _Method, *args: Any, **kwargs: Any) -> Any:
        """Call sync user code: in one of the replica's threads; inline when the cap is 1, or when the method
        has been measured to take well under a millisecond (switching back to threads if it slows down)."""
        if self._threads is None or method.fast:
            started = time.perf_counter()
            try:
                return method.call(*args, **kwargs)
            finally:
                method.observe(time.perf_counter() - started)

        def timed() -> Any:
            started = time.perf_counter()
            try:
                return method.call(*args, **kwargs)
            finally:
                method.observe(time.perf_counter() - started)

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._threads, contextvars.copy_context().run, timed)

    @property
    def max_batch_size(self) -> int:
        """The largest batch any batched method of this deployment takes now (1 when none is batched)."""
        return max([1, *(self.method(name).batch.max_batch_size for name in self._batched)])  # type: ignore[union-attr]

    async def start(self) -> None:
        """Run what must happen before the first request: the ingress app's lifespan, user_config."""
        if self.ingress is not None:
            self._lifespan = self.ingress.router.lifespan_context(self.ingress)
            await self._lifespan.__aenter__()
        user_config = self.spec.config.get("user_config")
        reconfigure = getattr(self.instance, "reconfigure", None)
        if user_config is not None and callable(reconfigure):
            result = reconfigure(user_config)
            if inspect.isawaitable(result):
                await result

    async def stop(self) -> None:
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)
        if self._threads is not None:
            self._threads.shutdown(wait=False, cancel_futures=True)

    def method(self, name: str) -> _Method:
        found = self._methods.get(name)
        if found is not None:
            return found
        if self.is_function:
            if name != "__call__":
                raise DeploymentNotFoundError(f"function deployment '{self.name}' has only __call__, not '{name}'")
            call = self.target
        else:
            call = getattr(self.instance, name, None) if (name == "__call__" or not name.startswith("_")) else None
            if not callable(call):
                public = sorted(
                    n for n in dir(self.instance) if not n.startswith("_") and callable(getattr(self.instance, n))
                )
                raise DeploymentNotFoundError(
                    f"deployment '{self.name}' has no method '{name}' (public methods: {', '.join(public) or 'none'})"
                )
        found = self._methods[name] = _Method(call, self.spec.config.get("max_batch_size"))
        return found

    def batch_config(self, env: Envelope) -> BatchConfig | None:
        """The `@batch` options of the method this request calls (None: run it on its own)."""
        if env.http is not None and self.ingress is not None and env.method == "__call__":
            return None
        try:
            return self.method(env.method).batch
        except DeploymentNotFoundError:
            return None

    def _batched_methods(self) -> list[str]:
        """The names of this deployment's `@batch` methods."""
        if self.is_function:
            names = ["__call__"]
        else:
            names = [n for n in dir(type(self.instance)) if n == "__call__" or not n.startswith("_")]
        found = []
        for name in names:
            owner = self.target if self.is_function else getattr(type(self.instance), name, None)
            if callable(owner) and batcher_of(owner) is not None:
                self.method(name)  # applies the deployment's max_batch_size override now
                found.append(name)
        return found

    async def run_batch(self, envs: list[Envelope]) -> list[Outcome]:
        """Run requests for one batched method as batches; outcomes come back in the same order."""
        method = self.method(envs[0].method)
        items: list[Item[int]] = []
        for i, env in enumerate(envs):
            if env.http is not None:
                items.append(Item(i, (ServeRequest(build_scope(env.http), body_of(env.http)),), {}, env.deadline))
            else:
                items.append(Item(i, tuple(env.args), dict(env.kwargs), env.deadline))
        if method.batcher is None:  # not batched after all: one call per request
            return [await self.run(env) for env in envs]
        logger.debug("%s: %d requests for batches", envs[0].task_name, len(items))
        by_model: dict[str, list[int]] = {}
        for i, env in enumerate(envs):  # as in Ray, a batch's requests are all for the same multiplexed model
            by_model.setdefault(env.model_id, []).append(i)
        outcomes: list[Outcome] = [Outcome()] * len(envs)
        for model_id, indexes in by_model.items():
            token = set_multiplexed_model_id(model_id)
            try:
                done = await method.batcher.run_items(method.owner, [items[i] for i in indexes])
            finally:
                reset_multiplexed_model_id(token)
            for i, outcome in zip(indexes, done, strict=True):
                outcomes[i] = outcome
        return outcomes

    async def run(self, env: Envelope) -> Outcome:
        """Call the user's code for one request; never raises (an error is the outcome)."""
        token = set_multiplexed_model_id(env.model_id)  # serve.get_multiplexed_model_id() for this request
        try:
            return await self._run(env)
        finally:
            reset_multiplexed_model_id(token)

    async def _run(self, env: Envelope) -> Outcome:
        try:
            if env.http is not None:
                return Outcome(value=await self._call_http(env))
            method = self.method(env.method)
            if method.is_async:
                value = method.call(*env.args, **env.kwargs)
            else:
                value = await self._call_sync(method, *env.args, **env.kwargs)
            if inspect.isawaitable(value):
                value = await value
            return Outcome(value=value)
        except Exception as exc:  # noqa: BLE001 - every user error becomes the caller's error
            return Outcome(error=exc)

    async def handle(self, env: Envelope) -> str:
        """Run one request; returns its result record (success or failure), never raises."""
        return await self.record(env, await self.run(env))

    async def record(self, env: Envelope, outcome: Outcome) -> str:
        """The result record for the caller: the value (as an HTTP response for an HTTP caller) or the error."""
        if outcome.error is not None:
            error = outcome.error if isinstance(outcome.error, Exception) else Exception(repr(outcome.error))
            return self._failure(env, error)
        value = outcome.value
        try:
            if env.http_reply and not _is_response_dict(value):
                value = await encode_result(value, build_scope(env.http or _PLAIN_HTTP))
            try:
                return _results.success(env.job_id, value)
            except strictjson.NotJSONError:
                raise
            except (TypeError, ValueError):
                return _results.success(env.job_id, to_jsonable(value))
        except strictjson.NotJSONError as exc:
            message = f"deployment '{self.name}' returned a result that is not valid JSON: {exc}"
            return self._failure(env, ResultNotJSONError(message))
        except Exception as exc:  # noqa: BLE001 - an unencodable result fails only its request
            return self._failure(env, exc)

    async def _call_http(self, env: Envelope) -> Any:
        http = env.http or {}
        if self.ingress is not None and env.method == "__call__":
            return await run_asgi_streaming(self.ingress, build_scope(http, root_path=self.root_path), body_of(http))
        method = self.method(env.method)
        request = ServeRequest(build_scope(http), body_of(http))
        if method.is_async:
            value = method.call(request) if method.takes_request else method.call()
        elif method.takes_request:
            if request.is_form:
                await request.form()
            value = await self._call_sync(method, request)
        else:
            value = await self._call_sync(method)
        if inspect.isawaitable(value):
            value = await value
        return value

    def _failure(self, env: Envelope, exc: Exception) -> str:
        if isinstance(exc, ServeError):
            status = exc.http_status
            error = exc.to_dict()
            logger.info("%s %s -> %s: %s", env.task_name, env.task_id, type(exc).__name__, exc)
        else:
            status = 500
            error = {"exc_type": type(exc).__name__, "exc_message": str(exc), "exc_module": type(exc).__module__}
            logger.error("%s %s raised %s", env.task_name, env.task_id, type(exc).__name__, exc_info=exc)
        error["deployment"] = self.name
        if env.in_pipeline:  # a pipeline step: say which one failed
            error["step"] = self.name
            error["exc_message"] = f"step '{self.name}' failed: {error['exc_message']}"
        return _results.failure(env.job_id, error, status)


_PLAIN_HTTP: dict[str, Any] = {"method": "POST", "path": "/"}


def _is_response_dict(value: Any) -> bool:
    """Already an HTTP response (a FastAPI ingress's, captured in the replica)."""
    return isinstance(value, dict) and value.keys() == {"status_code", "headers", "body", "body_encoding"}


def _make_handle(app: str, deployment: str) -> DeploymentHandle:
    return DeploymentHandle(deployment, app)
