"""`DeploymentHandle` and `DeploymentResponse`: calling a deployment from Python, as in Ray Serve.

`handle.remote(...)` enqueues at once and returns a response you can `await` or `.result()`;
`handle.method.remote(...)` and `handle.options(method_name=...)` call other methods. Arguments travel as
JSON. A `DeploymentResponse` passed as an argument is awaited first, so calls can be chained.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Generator
from typing import Any

from celery_serve._runtime import context as _context
from celery_serve._wire import results as _results
from celery_serve.exceptions import RequestTimeoutError


class DeploymentResponse:
    """The pending result of one handle call."""

    def __init__(self, future: concurrent.futures.Future[Any], deployment: str) -> None:
        self._future = future
        self._deployment = deployment

    def result(self, timeout_s: float | None = None) -> Any:
        """Block until the result is there; raises the remote error, or `RequestTimeoutError`."""
        try:
            return self._future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            raise RequestTimeoutError(
                f"no result from deployment '{self._deployment}' within {timeout_s}s "
                "(the request goes on until its own deadline)"
            ) from None

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.wrap_future(self._future).__await__()

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> bool:
        """Stop waiting for the result (the request itself still runs if a replica already took it)."""
        return self._future.cancel()

    def __repr__(self) -> str:
        return f"DeploymentResponse(deployment={self._deployment!r}, done={self.done()})"


class DeploymentHandle:
    """A reference to a deployment that can be called from any process that reaches its Redis."""

    def __init__(
        self,
        deployment_name: str,
        app_name: str = "default",
        *,
        method_name: str = "__call__",
        multiplexed_model_id: str = "",
    ) -> None:
        self.deployment_name = deployment_name
        self.app_name = app_name
        self.method_name = method_name
        self.multiplexed_model_id = multiplexed_model_id

    def options(self, *, method_name: str | None = None, multiplexed_model_id: str | None = None) -> DeploymentHandle:
        """A copy calling another method, or naming the multiplexed model its requests are for."""
        return type(self)(
            self.deployment_name,
            self.app_name,
            method_name=method_name or self.method_name,
            multiplexed_model_id=self.multiplexed_model_id if multiplexed_model_id is None else multiplexed_model_id,
        )

    def __getattr__(self, name: str) -> DeploymentHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def remote(self, *args: Any, **kwargs: Any) -> DeploymentResponse:
        io = _context.io_loop()
        future = io.run(
            _call(
                io.transport,
                self.app_name,
                self.deployment_name,
                self.method_name,
                args,
                kwargs,
                self.multiplexed_model_id,
            )
        )
        return DeploymentResponse(future, self.deployment_name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (self.deployment_name, self.app_name, self.method_name, self.multiplexed_model_id))

    def __repr__(self) -> str:
        return (
            f"DeploymentHandle(app={self.app_name!r}, deployment={self.deployment_name!r}, method={self.method_name!r})"
        )


def _rebuild(deployment: str, app: str, method: str, model_id: str = "") -> DeploymentHandle:
    return DeploymentHandle(deployment, app, method_name=method, multiplexed_model_id=model_id)


async def _resolve(value: Any) -> Any:
    if isinstance(value, DeploymentResponse):
        return await asyncio.wrap_future(value._future)
    if isinstance(value, list):
        return [await _resolve(v) for v in value]
    if isinstance(value, dict):
        return {k: await _resolve(v) for k, v in value.items()}
    return value


async def _call(
    transport: Any, app: str, deployment: str, method: str, args: Any, kwargs: Any, model_id: str = ""
) -> Any:
    args = [await _resolve(a) for a in args]
    kwargs = {k: await _resolve(v) for k, v in kwargs.items()}
    target = await transport.target(app, deployment)
    options = {"multiplexed_model_id": model_id} if model_id else {}
    record = await transport.call(target, method, args, kwargs, **options)
    return _results.unwrap(record, deployment)
