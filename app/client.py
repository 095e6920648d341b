"""The Python client: call deployments, submit jobs and fan work out, over HTTP or straight onto Redis.

    client = Client("http://127.0.0.1:8000")               # through a gateway
    client = Client(redis_url="redis://10.0.0.5:6379/0")   # straight onto the queues, no gateway

    client.call("Embedder", "some text")                   # a synchronous result
    job = client.submit("Embedder.embed_many", texts)      # a durable job: job.status(), .result(), .cancel()
    client.map("Embedder", texts, concurrency=16)          # many requests, results in order

A target is "Deployment" or "Deployment.method" (the application is the client's `app`, or "app:Deployment").
Both transports use the same envelope, deadlines and job records, and raise the same exceptions:
`DeploymentNotFoundError`, `BackpressureError`, `RequestTimeoutError`, `JobCancelledError`, and
`RemoteError` (carrying the remote type and message) for errors raised by user code.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from celery_serve._runtime import context as _context
from celery_serve._wire import streams as _streams
from celery_serve._wire.jobs import TERMINAL, JobStore, check_job_id
from celery_serve.exceptions import (
    BackpressureError,
    DeploymentNotFoundError,
    JobCancelledError,
    RequestTimeoutError,
    ServeError,
    StreamUsageError,
    error_from_dict,
)
from celery_serve.handle import DeploymentHandle

if TYPE_CHECKING:
    import httpx

__all__ = ["AsyncClient", "Client", "Job", "get_deployment_handle"]

_FAR_FUTURE_S = 7 * 24 * 3600.0


def get_deployment_handle(deployment_name: str, app_name: str = "default") -> DeploymentHandle:
    """A handle to a deployment from any process that reaches its Redis (after `run`, or with REDIS_URL)."""
    return DeploymentHandle(deployment_name, app_name)


def _parse_target(target: str, default_app: str) -> tuple[str, str, str]:
    app, _, rest = target.rpartition(":")
    deployment, _, method = rest.partition(".")
    if not deployment:
        raise ServeError(f"target must be 'Deployment' or 'Deployment.method', got {target!r}")
    return app or default_app, deployment, method or "__call__"


def _raise_for_job(job: dict[str, Any]) -> Any:
    status = job["status"]
    if status == "succeeded":
        return job.get("result")
    error = job.get("error") or {}
    if status == "cancelled":
        raise JobCancelledError(error.get("message") or f"job {job['job_id']} was cancelled")
    if status == "expired":
        raise RequestTimeoutError(error.get("message") or f"job {job['job_id']} passed its deadline before it ran")
    raise error_from_dict(
        {
            "exc_type": error.get("type", "Exception"),
            "exc_message": error.get("message", ""),
            "exc_module": _module_of(error.get("type")),
        },
        job.get("deployment") or "",
    )


def _module_of(exc_type: str | None) -> str:
    from celery_serve import exceptions

    return "celery_serve.exceptions" if exc_type and isinstance(getattr(exceptions, exc_type, None), type) else "remote"


def _raise_for_response(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        data = response.json()
    except ValueError:
        data = {}
    message = str(data.get("message") or data.get("detail") or response.text)
    exc_type = str(data.get("error") or "")
    if response.status_code == 503 and exc_type == "BackpressureError":
        raise BackpressureError(message)
    if response.status_code == 404:
        raise DeploymentNotFoundError(message)
    raise error_from_dict(
        {"exc_type": exc_type or "ServeError", "exc_message": message, "exc_module": _module_of(exc_type)}
    )


class _HttpTransport:
    def __init__(self, url: str, timeout_s: float) -> None:
        import httpx  # only the HTTP transport needs it; replicas import this module too

        self.http = httpx.AsyncClient(base_url=url.rstrip("/"), timeout=httpx.Timeout(timeout_s + 10))

    async def submit(
        self, app: str, deployment: str, method: str, args: Sequence[Any], kwargs: dict[str, Any], key: str | None
    ) -> str:
        path = f"/jobs/{deployment}" + ("" if method == "__call__" else f"/{method}")
        headers = {"Idempotency-Key": key} if key else {}
        response = await self.http.post(
            path, params={"app": app}, json={"args": list(args), "kwargs": kwargs}, headers=headers
        )
        _raise_for_response(response)
        return str(response.json()["job_id"])

    async def job(self, job_id: str, wait_s: float = 0) -> dict[str, Any]:
        response = await self.http.get(f"/jobs/{job_id}", params={"wait": wait_s} if wait_s > 0 else None)
        _raise_for_response(response)
        return dict(response.json())

    async def cancel(self, job_id: str) -> dict[str, Any]:
        response = await self.http.delete(f"/jobs/{job_id}")
        if response.status_code == 409:
            return await self.job(job_id)
        _raise_for_response(response)
        return dict(response.json())

    async def stream(
        self, app: str, deployment: str, method: str, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        """Submit the call as a job and follow its stream; a dropped connection resumes at the next chunk."""
        import httpx

        job_id = await self.submit(app, deployment, method, args, kwargs, None)
        position, breaks = 0, 0
        while True:
            try:
                async with self.http.stream(
                    "GET", f"/jobs/{job_id}/stream", params={"from": position, "format": "items"}
                ) as response:
                    if response.status_code == 409:  # the job ended without streaming: say why
                        await response.aread()
                        _raise_for_job(await self.job(job_id))
                        raise StreamUsageError(
                            f"'{deployment}.{method}' returned a value, not a generator: use call() or submit()"
                        )
                    if response.status_code >= 400:
                        await response.aread()
                        _raise_for_response(response)
                    lines = response.aiter_lines()
                    try:
                        async for line in lines:
                            if not line:
                                continue
                            item = json.loads(line)
                            if "end" in item:
                                return
                            if "error" in item:
                                raise error_from_dict(item["error"], deployment)
                            position, breaks = item["i"] + 1, 0
                            yield _streams.decode_chunk(item["t"].encode(), _item_bytes(item))
                    finally:
                        await lines.aclose()  # type: ignore[attr-defined]
            except httpx.TransportError as exc:
                cause: BaseException = exc
            else:
                cause = ConnectionError("the response ended before the stream did")
            breaks += 1
            if breaks > _STREAM_RETRIES:
                raise ServeError(
                    f"the stream of job {job_id} broke {breaks} times in a row ({cause}); "
                    f"GET /jobs/{job_id}/stream?from={position} resumes it"
                ) from cause
            await asyncio.sleep(0.1 * breaks)

    async def close(self) -> None:
        await self.http.aclose()


class _RedisTransport:
    """Straight onto the deployment's queue, with the gateway's envelope, deadlines and job records."""

    def __init__(self, redis_url: str) -> None:
        from celery_serve._wire.transport import QueueTransport

        self.queue = QueueTransport(redis_url)
        self.jobs = JobStore(self.queue.redis)
        self._started = False

    async def _start(self) -> None:
        if not self._started:
            await self.queue.start()
            self._started = True

    async def call(self, app: str, deployment: str, method: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        from celery_serve._wire import results as _results

        await self._start()
        target = await self.queue.target(app, deployment)
        return _results.unwrap(await self.queue.call(target, method, list(args), kwargs), deployment)

    async def submit(
        self, app: str, deployment: str, method: str, args: Sequence[Any], kwargs: dict[str, Any], key: str | None
    ) -> str:
        target = await self.queue.target(app, deployment)
        sub = await self.queue.submit(
            target, method, list(args), kwargs, job=True, idempotency_key=key, expect_reply=False
        )
        return sub.task_id

    async def stream(
        self, app: str, deployment: str, method: str, args: Sequence[Any], kwargs: dict[str, Any]
    ) -> AsyncIterator[Any]:
        """Call and follow the stream; leaving the iteration early stops the generator in the replica."""
        from celery_serve.handle import _END, _open_stream

        await self._start()
        remote = await _open_stream(self.queue, app, deployment, method, args, kwargs)
        finished = False
        try:
            while True:
                item = await remote.next()
                if item is _END:
                    finished = True
                    return
                yield item
        except Exception:
            finished = True  # the stream itself ended with an error
            raise
        finally:
            if not finished:
                await remote.cancel()
            remote.follower.close()

    async def job(self, job_id: str, wait_s: float = 0) -> dict[str, Any]:
        return await (self.jobs.wait(job_id, wait_s) if wait_s > 0 else self.jobs.get(job_id))

    async def cancel(self, job_id: str) -> dict[str, Any]:
        return await self.jobs.cancel(job_id)

    async def close(self) -> None:
        await self.jobs.close()
        if self._started:
            await self.queue.close()
        else:
            await self.queue.redis.aclose()


class AsyncClient:
    """The client for asyncio code; `Client` is the same on a background event loop."""

    def __init__(
        self, url: str | None = None, *, redis_url: str | None = None, app: str = "default", timeout_s: float = 60.0
    ) -> None:
        if (url is None) == (redis_url is None):
            raise ServeError("give the gateway's URL (Client('http://host:8000')) or redis_url=..., not both")
        self.app = app
        self.timeout_s = timeout_s
        self._transport: _HttpTransport | _RedisTransport = (
            _HttpTransport(url, timeout_s) if url is not None else _RedisTransport(str(redis_url))
        )

    async def call(self, target: str, *args: Any, **kwargs: Any) -> Any:
        """Run one request and return its result (raises its error)."""
        app, deployment, method = _parse_target(target, self.app)
        if isinstance(self._transport, _RedisTransport):
            return await self._transport.call(app, deployment, method, args, kwargs)
        job = await self.submit(target, *args, **kwargs)
        return await job.result(self.timeout_s)

    async def submit(self, target: str, *args: Any, idempotency_key: str | None = None, **kwargs: Any) -> AsyncJob:
        """Queue one request as a durable job and return at once."""
        app, deployment, method = _parse_target(target, self.app)
        job_id = await self._transport.submit(app, deployment, method, args, kwargs, idempotency_key)
        return AsyncJob(self, job_id)

    def job(self, job_id: str) -> AsyncJob:
        return AsyncJob(self, check_job_id(job_id))

    def stream(self, target: str, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        """Call a generator method and iterate its items as the replica yields them (`async for`).

        Over HTTP the call is a job followed on `GET /jobs/{id}/stream`, resumed at the next chunk if the
        connection drops; over Redis it is followed on the stream itself, and leaving the loop early stops
        the generator. An error in the replica is raised after the items before it."""
        app, deployment, method = _parse_target(target, self.app)
        return self._transport.stream(app, deployment, method, args, kwargs)

    async def map(
        self, target: str, items: Iterable[Any], *, concurrency: int = 8, progress: bool | None = None
    ) -> list[Any]:
        """Call `target` once per item (each item is the one argument), at most `concurrency` at a time.

        Results come back in the order of `items`; the first error is raised once all calls ended. The
        progress bar shows on a terminal unless `progress=False`.
        """
        if concurrency < 1:
            raise ServeError(f"concurrency must be >= 1, got {concurrency}")
        work = list(items)
        results: list[Any] = [None] * len(work)
        errors: list[BaseException | None] = [None] * len(work)
        bar = _progress_bar(len(work), target, progress)
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int, item: Any) -> None:
            async with gate:
                try:
                    results[i] = await self.call(target, item)
                except ServeError as exc:
                    errors[i] = exc
                finally:
                    if bar is not None:
                        bar.update(1)

        try:
            await asyncio.gather(*(one(i, item) for i, item in enumerate(work)))
        finally:
            if bar is not None:
                bar.close()
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise first
        return results

    async def aclose(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncJob:
    """A submitted job; everything about it is read from Redis (through the gateway or directly)."""

    def __init__(self, client: AsyncClient, job_id: str) -> None:
        self._client = client
        self.id = job_id

    async def info(self) -> dict[str, Any]:
        return await self._client._transport.job(self.id)

    async def status(self) -> str:
        return str((await self.info())["status"])

    async def result(self, timeout_s: float | None = None) -> Any:
        """Wait for the job to end (long-polling, no busy loop) and return its result or raise its error."""
        deadline = time.monotonic() + (timeout_s if timeout_s is not None else _FAR_FUTURE_S)
        while True:
            remaining = deadline - time.monotonic()
            job = await self._client._transport.job(self.id, wait_s=max(0.0, min(remaining, 60.0)))
            if job["status"] in TERMINAL:
                return _raise_for_job(job)
            if time.monotonic() >= deadline:
                raise RequestTimeoutError(f"job {self.id} is still {job['status']} after {timeout_s}s")

    async def cancel(self) -> dict[str, Any]:
        return await self._client._transport.cancel(self.id)

    def __repr__(self) -> str:
        return f"AsyncJob({self.id!r})"


class Client:
    """The synchronous client (see the module docstring); runs an `AsyncClient` on a background loop."""

    def __init__(
        self, url: str | None = None, *, redis_url: str | None = None, app: str = "default", timeout_s: float = 60.0
    ) -> None:
        self._io = _context.BackgroundLoop()
        self._async = self._io.run_sync(_make_async(url, redis_url, app, timeout_s))

    def call(self, target: str, *args: Any, **kwargs: Any) -> Any:
        return self._io.run_sync(self._async.call(target, *args, **kwargs))

    def submit(self, target: str, *args: Any, idempotency_key: str | None = None, **kwargs: Any) -> Job:
        return Job(
            self, self._io.run_sync(self._async.submit(target, *args, idempotency_key=idempotency_key, **kwargs))
        )

    def job(self, job_id: str) -> Job:
        return Job(self, self._async.job(job_id))

    def stream(self, target: str, *args: Any, **kwargs: Any) -> Iterator[Any]:
        """Call a generator method and iterate its items as they come (see `AsyncClient.stream`)."""
        items = self._async.stream(target, *args, **kwargs)
        finished = False
        try:
            while True:
                item = self._io.run_sync(_next_item(items))
                if item is _DONE:
                    finished = True
                    return
                yield item
        finally:
            if not finished:
                self._io.run_sync(items.aclose())  # type: ignore[attr-defined]

    def map(
        self, target: str, items: Iterable[Any], *, concurrency: int = 8, progress: bool | None = None
    ) -> list[Any]:
        return self._io.run_sync(self._async.map(target, items, concurrency=concurrency, progress=progress))

    def close(self) -> None:
        try:
            self._io.run_sync(self._async.aclose())
        finally:
            self._io.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Job:
    """A submitted job (synchronous API): `.id`, `.status()`, `.info()`, `.result(timeout_s)`, `.cancel()`."""

    def __init__(self, client: Client, job: AsyncJob) -> None:
        self._client = client
        self._job = job
        self.id = job.id

    def info(self) -> dict[str, Any]:
        return self._client._io.run_sync(self._job.info())

    def status(self) -> str:
        return self._client._io.run_sync(self._job.status())

    def result(self, timeout_s: float | None = None) -> Any:
        return self._client._io.run_sync(self._job.result(timeout_s))

    def cancel(self) -> dict[str, Any]:
        return self._client._io.run_sync(self._job.cancel())

    def __repr__(self) -> str:
        return f"Job({self.id!r})"


_DONE = object()
_STREAM_RETRIES = 3


async def _next_item(items: AsyncIterator[Any]) -> Any:
    try:
        return await anext(items)
    except StopAsyncIteration:
        return _DONE


def _item_bytes(item: dict[str, Any]) -> bytes:
    if item["t"] == "j":
        return json.dumps(item["v"]).encode()
    if item["t"] == "s":
        return str(item["v"]).encode("utf-8")
    return base64.b64decode(item["v"])


async def _make_async(url: str | None, redis_url: str | None, app: str, timeout_s: float) -> AsyncClient:
    return AsyncClient(url, redis_url=redis_url, app=app, timeout_s=timeout_s)


def _progress_bar(total: int, target: str, progress: bool | None) -> Any:
    if progress is False or (progress is None and not sys.stderr.isatty()):
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=target, unit="req")
