"""One replica of a deployment: the user's class constructed once, and each request turned into a call.

It knows nothing of queues: `handle(envelope)` returns the result record to store. The consumer decides
what to take from Redis and when.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from celery_serve._runtime.spec import AppSpec, resolve_deployment
from celery_serve._wire import results as _results
from celery_serve._wire import strictjson
from celery_serve._wire.envelope import Envelope
from celery_serve.batch import BatchConfig, batch_config
from celery_serve.exceptions import DeploymentNotFoundError, ResultNotJSONError, ServeError
from celery_serve.handle import DeploymentHandle
from celery_serve.workers.batching import Item, Outcome, form_batches, run_batch_async
from celery_serve.workers.http import ServeRequest, body_of, build_scope, encode_result, run_asgi, to_jsonable
from celery_serve.workers.ingress import bind_ingress

logger = logging.getLogger(__name__)


class _Method:
    __slots__ = ("call", "is_async", "takes_request", "batch")

    def __init__(self, call: Callable[..., Any], max_batch_size: int | None = None) -> None:
        self.call = call
        self.is_async = inspect.iscoroutinefunction(call)
        self.batch: BatchConfig | None = batch_config(call)
        if self.batch is not None and max_batch_size:
            self.batch = BatchConfig(max_batch_size, self.batch.batch_wait_timeout_s)
        try:
            params = [
                p
                for p in inspect.signature(call).parameters.values()
                if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
            ]
        except (TypeError, ValueError):
            params = [None]  # type: ignore[list-item]
        self.takes_request = bool(params)


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
        self.ingress = bind_ingress(ingress_app, target, self.instance) if ingress_app is not None else None
        self._methods: dict[str, _Method] = {}
        self._lifespan: Any = None
        self.max_batch_size = self._largest_batch()

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

    def _largest_batch(self) -> int:
        """The largest batch any batched method of this deployment takes (1 when none is batched)."""
        if self.is_function:
            names = ["__call__"]
        else:
            names = [n for n in dir(type(self.instance)) if n == "__call__" or not n.startswith("_")]
        sizes = [1]
        for name in names:
            owner = self.target if self.is_function else getattr(type(self.instance), name, None)
            if callable(owner) and batch_config(owner) is not None:
                batch = self.method(name).batch
                sizes.append(batch.max_batch_size if batch else 1)
        return max(sizes)

    async def run_batch(self, envs: list[Envelope]) -> list[Outcome]:
        """Run requests for one batched method as batches; outcomes come back in the same order."""
        method = self.method(envs[0].method)
        max_size = method.batch.max_batch_size if method.batch else 1
        items: list[Item[int]] = []
        outcomes: list[Outcome] = [Outcome()] * len(envs)
        for i, env in enumerate(envs):
            if env.http is not None:
                items.append(Item(i, (ServeRequest(build_scope(env.http), body_of(env.http)),), {}, env.deadline))
            else:
                items.append(Item(i, tuple(env.args), dict(env.kwargs), env.deadline))
        for batch in form_batches(items, max_size):
            logger.debug("%s: batch of %d", envs[0].task_name, len(batch))
            for item, outcome in zip(batch, await run_batch_async(method.call, batch), strict=True):
                outcomes[item.key] = outcome
        return outcomes

    async def run(self, env: Envelope) -> Outcome:
        """Call the user's code for one request; never raises (an error is the outcome)."""
        try:
            if env.http is not None:
                return Outcome(value=await self._call_http(env))
            method = self.method(env.method)
            value = method.call(*env.args, **env.kwargs)
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
            return await run_asgi(self.ingress, build_scope(http, root_path=self.root_path), body_of(http))
        method = self.method(env.method)
        request = ServeRequest(build_scope(http), body_of(http))
        if method.takes_request:
            if not method.is_async and request.is_form:
                await request.form()
            value = method.call(request)
        else:
            value = method.call()
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
