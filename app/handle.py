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

import orjson

from celery_serve._runtime import context as _context
from celery_serve._wire import results as _results
from celery_serve._wire import streams as _streams
from celery_serve.exceptions import RequestTimeoutError, StreamUsageError, error_from_dict


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


class DeploymentResponseGenerator:
    """The chunks of a streaming handle call (`handle.options(stream=True).method.remote(...)`), as in Ray.

    Iterate it with `for` (blocking) or `async for`; each item is what the generator yielded (JSON values,
    `str` or `bytes`), as soon as the replica yields it. An error in the replica, before or during the
    stream, is raised from the iteration (`RemoteError` for exceptions of user code); the items before it
    were delivered. `request_id` is the job id (`GET /jobs/{id}/stream` replays the stream)."""

    def __init__(self, io: Any, opening: concurrent.futures.Future[Any], deployment: str) -> None:
        self._io = io
        self._opening = opening
        self._deployment = deployment

    @property
    def request_id(self) -> str:
        return str(self._opening.result().job_id)

    def __iter__(self) -> DeploymentResponseGenerator:
        return self

    def __next__(self) -> Any:
        stream = self._opening.result()
        item = self._io.run(stream.next()).result()
        if item is _END:
            raise StopIteration
        return item

    def __aiter__(self) -> DeploymentResponseGenerator:
        return self

    async def __anext__(self) -> Any:
        stream = await asyncio.wrap_future(self._opening)
        item = await asyncio.wrap_future(self._io.run(stream.next()))
        if item is _END:
            raise StopAsyncIteration
        return item

    def cancel(self) -> None:
        """Stop the stream: the generator in the replica is closed (`DELETE /jobs/{id}` does the same)."""
        stream = self._opening.result()
        self._io.run(stream.cancel()).result()

    def __repr__(self) -> str:
        return f"DeploymentResponseGenerator(deployment={self._deployment!r})"


class DeploymentHandle:
    """A reference to a deployment that can be called from any process that reaches its Redis."""

    def __init__(
        self,
        deployment_name: str,
        app_name: str = "default",
        *,
        method_name: str = "__call__",
        multiplexed_model_id: str = "",
        stream: bool = False,
    ) -> None:
        self.deployment_name = deployment_name
        self.app_name = app_name
        self.method_name = method_name
        self.multiplexed_model_id = multiplexed_model_id
        self.stream = stream

    def options(
        self, *, method_name: str | None = None, multiplexed_model_id: str | None = None, stream: bool | None = None
    ) -> DeploymentHandle:
        """A handle with other options: `method_name`; `multiplexed_model_id`, the multiplexed model its
        requests are for; `stream=True` for generator methods (`remote()` then returns a
        `DeploymentResponseGenerator`)."""
        return type(self)(
            self.deployment_name,
            self.app_name,
            method_name=method_name or self.method_name,
            multiplexed_model_id=self.multiplexed_model_id if multiplexed_model_id is None else multiplexed_model_id,
            stream=self.stream if stream is None else stream,
        )

    def __getattr__(self, name: str) -> DeploymentHandle:
        if name.startswith("_"):
            raise AttributeError(name)
        return self.options(method_name=name)

    def remote(self, *args: Any, **kwargs: Any) -> DeploymentResponse | DeploymentResponseGenerator:
        """Call the deployment: a `DeploymentResponse`, or with `options(stream=True)` a
        `DeploymentResponseGenerator` to iterate (`for` or `async for`)."""
        io = _context.io_loop()
        call = (self.app_name, self.deployment_name, self.method_name, args, kwargs, self.multiplexed_model_id)
        if self.stream:
            opening = io.run(_open_stream(io.transport, *call))
            return DeploymentResponseGenerator(io, opening, self.deployment_name)
        future = io.run(_call(io.transport, *call))
        return DeploymentResponse(future, self.deployment_name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild,
            (self.deployment_name, self.app_name, self.method_name, self.multiplexed_model_id, self.stream),
        )

    def __repr__(self) -> str:
        return (
            f"DeploymentHandle(app={self.app_name!r}, deployment={self.deployment_name!r}, method={self.method_name!r})"
        )


def _rebuild(deployment: str, app: str, method: str, model_id: str = "", stream: bool = False) -> DeploymentHandle:
    return DeploymentHandle(deployment, app, method_name=method, multiplexed_model_id=model_id, stream=stream)


async def _resolve(value: Any) -> Any:
    if isinstance(value, DeploymentResponse):
        return await asyncio.wrap_future(value._future)
    if isinstance(value, list):
        return [await _resolve(v) for v in value]
    if isinstance(value, dict):
        return {k: await _resolve(v) for k, v in value.items()}
    return value


async def _prepare(transport: Any, app: str, deployment: str, args: Any, kwargs: Any) -> tuple[Any, list, dict]:
    """The deployment's spec, and the call's arguments with the responses among them resolved."""
    resolved_args = [await _resolve(a) for a in args]
    resolved_kwargs = {k: await _resolve(v) for k, v in kwargs.items()}
    return await transport.target(app, deployment), resolved_args, resolved_kwargs


async def _call(
    transport: Any, app: str, deployment: str, method: str, args: Any, kwargs: Any, model_id: str = ""
) -> Any:
    target, args, kwargs = await _prepare(transport, app, deployment, args, kwargs)
    options = {"multiplexed_model_id": model_id} if model_id else {}
    record = await transport.call(target, method, args, kwargs, **options)
    return _results.unwrap(record, deployment)


_END = object()


class _RemoteStream:
    """The caller's end of one stream, on the handle loop."""

    def __init__(self, transport: Any, job_id: str, deployment: str) -> None:
        self.transport = transport
        self.job_id = job_id
        self.deployment = deployment
        self.follower = transport.streams.follow(_streams.key(job_id), _streams.HEAD_ID)

    async def next(self) -> Any:
        async for event in self.follower:
            if event.kind == _streams.CHUNK:
                return _streams.decode_chunk(event.type, event.data)
            if event.kind == _streams.END:
                return _END
            if event.kind == _streams.ERROR:
                raise error_from_dict(event.error, self.deployment)
        return _END

    async def cancel(self) -> None:
        from celery_serve._wire.jobs import JobStore

        self.follower.close()
        await JobStore(self.transport.redis).finish(self.job_id, "cancelled")


async def _open_stream(
    transport: Any, app: str, deployment: str, method: str, args: Any, kwargs: Any, model_id: str = ""
) -> _RemoteStream:
    """Submit a streaming call and wait until its replica starts the stream (or fails before it)."""
    target, args, kwargs = await _prepare(transport, app, deployment, args, kwargs)
    sub = await transport.submit(target, method, args, kwargs, stream="require", multiplexed_model_id=model_id)
    record = await transport.wait(sub, deployment)
    if record is None or record["status"] != _streams.STREAMING:
        _results.unwrap(record or {"status": "FAILURE", "result": {}}, deployment)  # raises a failure's error
        raise StreamUsageError(
            f"'{deployment}.{method}' answered with a value, not a stream: {orjson.dumps(record)[:200]!r}"
        )
    return _RemoteStream(transport, sub.task_id, deployment)
