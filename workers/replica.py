"""One replica of a deployment: the user's class constructed once, and each request turned into a call.

It knows nothing of queues: `handle(envelope)` returns the result record to store. The consumer decides
what to take from Redis and when.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from app import _results
from app._envelope import Envelope
from app._spec import AppSpec, resolve_deployment
from app.exceptions import DeploymentNotFoundError, ServeError
from app.handle import DeploymentHandle
from workers.http import ServeRequest, body_of, build_scope, encode_result, run_asgi, to_jsonable
from workers.ingress import bind_ingress

logger = logging.getLogger(__name__)


class _Method:
    __slots__ = ("call", "is_async", "takes_request")

    def __init__(self, call: Callable[..., Any]) -> None:
        self.call = call
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
                public = sorted(n for n in dir(self.instance) if not n.startswith("_") and callable(getattr(self.instance, n)))
                raise DeploymentNotFoundError(
                    f"deployment '{self.name}' has no method '{name}' (public methods: {', '.join(public) or 'none'})"
                )
        found = self._methods[name] = _Method(call)
        return found

    async def handle(self, env: Envelope) -> str:
        """Run one request; returns its result record (success or failure), never raises."""
        try:
            if env.http is not None:
                value = await self._handle_http(env)
            else:
                method = self.method(env.method)
                value = method.call(*env.args, **env.kwargs)
                if inspect.isawaitable(value):
                    value = await value
            try:
                return _results.success(env.task_id, value)
            except (TypeError, ValueError):
                return _results.success(env.task_id, to_jsonable(value))
        except Exception as exc:  # noqa: BLE001 - every user error becomes the caller's error
            return self._failure(env, exc)

    async def _handle_http(self, env: Envelope) -> Any:
        http = env.http or {}
        if self.ingress is not None and env.method == "__call__":
            return await run_asgi(self.ingress, build_scope(http, root_path=self.root_path), body_of(http))
        method = self.method(env.method)
        scope = build_scope(http)
        request = ServeRequest(scope, body_of(http))
        if method.takes_request:
            if not method.is_async and request.is_form:
                await request.form()
            value = method.call(request)
        else:
            value = method.call()
        if inspect.isawaitable(value):
            value = await value
        return await encode_result(value, scope)

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
        return _results.failure(env.task_id, error, status)


def _make_handle(app: str, deployment: str) -> DeploymentHandle:
    return DeploymentHandle(deployment, app)
