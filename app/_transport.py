"""Sending requests to deployments' queues and awaiting their results, on one asyncio event loop.

Used by the gateway (on uvicorn's loop) and by handles and the client (on a background loop). Results come
back on the caller's own reply list, which one listener drains in batches: no thread and no connection per
waiting request, no polling.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis.exceptions

from app import _keys, _scripts
from app._envelope import build_message, new_task_id
from app._redis import BLOCK_S, async_client
from app._spec import AppSpec, DeploymentSpec
from app.exceptions import BackpressureError, DeploymentNotFoundError, RequestTimeoutError

logger = logging.getLogger(__name__)

_DRAIN = 512
_SPEC_TTL_S = 2.0


class ResultWaiter:
    """Resolves futures by task id from records pushed to this process's reply list."""

    def __init__(self, url: str) -> None:
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.reply_key = _keys.reply(self.id)
        self._url = url
        self._futures: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return len(self._futures)

    async def start(self) -> None:
        self._conn = async_client(self._url, single_connection=True)
        self._task = asyncio.create_task(self._listen(), name=f"reply-listener {self.reply_key}")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=1.0)
        await self._conn.aclose()
        for fut in self._futures.values():
            fut.cancel()
        self._futures.clear()

    def expect(self, task_id: str) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._futures[task_id] = fut
        return fut

    def discard(self, task_id: str) -> None:
        self._futures.pop(task_id, None)

    async def _listen(self) -> None:
        conn = self._conn
        while True:
            try:
                got = await conn.blpop([self.reply_key], timeout=BLOCK_S)
                if got is None:
                    continue
                self._resolve(got[1])
                while True:
                    more = await conn.lpop(self.reply_key, _DRAIN)
                    if not more:
                        break
                    for raw in more:
                        self._resolve(raw)
                    if len(more) < _DRAIN:
                        break
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                logger.warning("reply listener lost Redis (%s); reconnecting", exc)
                await asyncio.sleep(0.5)

    def _resolve(self, raw: bytes) -> None:
        record = json.loads(raw)
        fut = self._futures.pop(record.get("task_id"), None)
        if fut is not None and not fut.done():
            fut.set_result(record)


@dataclass
class Submitted:
    """A request on its way: its id, the future its result arrives on, and its deadline."""

    task_id: str
    future: asyncio.Future[dict[str, Any]]
    deadline: float
    existing: bool = False  # an idempotency key matched an earlier job; nothing new was queued


class QueueTransport:
    """Enqueue a request for a deployment and await its result record."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.redis = async_client(url)
        self.waiter = ResultWaiter(url)
        self._enqueue = self.redis.register_script(_scripts.ENQUEUE)
        self._specs: dict[str, tuple[float, AppSpec]] = {}

    async def start(self) -> None:
        await self.waiter.start()

    async def close(self) -> None:
        await self.waiter.close()
        await self.redis.aclose()

    async def app_spec(self, app: str, *, refresh: bool = False) -> AppSpec:
        cached = self._specs.get(app)
        if cached and not refresh and time.monotonic() - cached[0] < _SPEC_TTL_S:
            return cached[1]
        raw = await self.redis.hget(_keys.APPS, app)
        if raw is None:
            self._specs.pop(app, None)
            raise DeploymentNotFoundError(f"no application named '{app}' is deployed")
        spec = AppSpec.from_json(raw)
        self._specs[app] = (time.monotonic(), spec)
        return spec

    async def deployment(self, app: str, name: str) -> DeploymentSpec:
        spec = await self.app_spec(app)
        if name not in spec.deployments:
            spec = await self.app_spec(app, refresh=True)
        try:
            return spec.deployments[name]
        except KeyError:
            known = ", ".join(sorted(spec.deployments))
            raise DeploymentNotFoundError(
                f"application '{app}' has no deployment named '{name}' (it has: {known})"
            ) from None

    async def submit(
        self,
        dep: DeploymentSpec,
        method: str,
        args: list[Any] | tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        http: dict[str, Any] | None = None,
        task_id: str | None = None,
        timeout_s: float | None = None,
        expect_reply: bool = True,
        job: bool = False,
        idempotency_key: str | None = None,
    ) -> Submitted:
        """Put one request on the deployment's queue.

        Every request is a job (`GET /jobs/{id}` finds it); `job=True` marks an asynchronous job, kept
        for the deployment's `job_retention_s` instead of `request_retention_s`. With an idempotency key,
        a repeated submit returns the first job's id and enqueues nothing. With `expect_reply=False` the
        future is never resolved here (the result is only stored).
        """
        config = dep.config
        timeout = timeout_s if timeout_s is not None else config["request_timeout_s"]
        retention = int(config.get("job_retention_s" if job else "request_retention_s") or 86400)
        task_id = task_id or new_task_id()
        now = time.time()
        deadline = now + timeout
        message = build_message(
            task_id=task_id,
            app=dep.app,
            deployment=dep.name,
            method=method,
            args=args,
            kwargs=kwargs,
            deadline=deadline,
            reply_to=self.waiter.reply_key if expect_reply else None,
            http=http,
            retention_s=retention,
        )
        fut = self.waiter.expect(task_id) if expect_reply else asyncio.get_running_loop().create_future()
        idem_key = _keys.idempotency(dep.app, dep.name, idempotency_key) if idempotency_key else _keys.queue(dep.app, dep.name)
        try:
            depth, job_id = await self._enqueue(
                keys=[dep.queue, _keys.job(task_id), idem_key],
                args=[
                    config["max_queued_requests"],
                    message,
                    task_id,
                    now,
                    retention,
                    dep.app,
                    dep.name,
                    method,
                    deadline,
                    1 if idempotency_key else 0,
                    self.waiter.reply_key if expect_reply else "",
                    "async" if job else "sync",
                ],
            )
        except BaseException:
            self.waiter.discard(task_id)
            raise
        if depth == 0:
            self.waiter.discard(task_id)
            return Submitted(job_id.decode(), fut, deadline, existing=True)
        if depth == -1:
            self.waiter.discard(task_id)
            raise BackpressureError(
                f"deployment '{dep.name}' already has {config['max_queued_requests']} requests waiting; "
                "retry shortly or raise max_queued_requests / num_replicas"
            )
        return Submitted(task_id, fut, deadline)

    async def wait(self, sub: Submitted, dep: str, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The result record; `RequestTimeoutError` at the request's deadline; None when `timeout_s`
        (shorter than the deadline) passed first, while the request goes on."""
        remaining = max(sub.deadline - time.time(), 0.0)
        early = timeout_s is not None and timeout_s < remaining
        try:
            async with asyncio.timeout(timeout_s if early else remaining):
                return await sub.future
        except TimeoutError:
            if early:
                return None
            raise RequestTimeoutError(
                f"no result from deployment '{dep}' within its request timeout (request {sub.task_id})"
            ) from None
        finally:
            self.waiter.discard(sub.task_id)

    async def call(
        self,
        dep: DeploymentSpec,
        method: str,
        args: list[Any] | tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        sub = await self.submit(dep, method, args, kwargs, **options)
        record = await self.wait(sub, dep.name)
        if record is None:  # unreachable without timeout_s; keeps the type checker honest
            raise RequestTimeoutError(f"no result from deployment '{dep.name}' (request {sub.task_id})")
        return record
