"""The application the job and client tests serve: `jobs`, at route prefix /jobtest.

Module level, so worker processes import it as they would a user's module. What ran is recorded in the
Redis the replica serves from (`REDIS_URL`, set in every replica process), with the execution counters of
`tests.deployments` and keys starting with `serve-test-jobs:`, so tests can prove that work ran, ran once,
or never ran. Work that must stay busy waits for the test to push to its release key instead of sleeping a
fixed time.

    Front       the HTTP ingress: echoes the request; `slow` waits for its release key (async)
    Gate        one replica, one request at a time (sync): `hold` keeps it busy so later jobs stay queued
    AsyncWork   async methods: one that can be cancelled while it runs, one for map()
    ShortLived  Gate with a 1.5 s deadline, 2 s retention and a queue of one (expiry, retention, 503)
    Crashy      one replica whose first run of a job blocks until the test kills it
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import redis
import redis.asyncio as aioredis
from starlette.requests import Request

from celery_serve import DeploymentHandle, deployment
from celery_serve._wire import keys as _keys
from tests.deployments import _redis, executions_key, record_execution

APP_NAME = "jobs"
ROUTE_PREFIX = "/jobtest"
KEY_PREFIX = "serve-test-jobs:"
HOLD_TIMEOUT_S = 60.0


def release_key(tag: str) -> str:
    """Held work returns once the test pushes here."""
    return f"{KEY_PREFIX}release:{tag}"


def done_key(tag: str) -> str:
    """Set when held work returns (whatever became of its job)."""
    return f"{KEY_PREFIX}done:{tag}"


def stopped_key(tag: str) -> str:
    """Set when running async work was cancelled."""
    return f"{KEY_PREFIX}stopped:{tag}"


_async_client: aioredis.Redis | None = None


def _aredis() -> aioredis.Redis:
    global _async_client
    if _async_client is None:
        _async_client = aioredis.Redis.from_url(os.environ["REDIS_URL"])
    return _async_client


def wait_for_release(tag: str, timeout_s: float = HOLD_TIMEOUT_S) -> bool:
    return _redis().blpop([release_key(tag)], timeout=timeout_s) is not None


@deployment(num_replicas=1, max_ongoing_requests=1)
class Gate:
    """One replica running one synchronous request at a time."""

    def hold(self, tag: str, timeout_s: float = HOLD_TIMEOUT_S) -> str:
        """Keep the replica busy until the test releases it."""
        record_execution(tag)
        try:
            return "released" if wait_for_release(tag, timeout_s) else "not released"
        finally:
            _redis().set(done_key(tag), 1, ex=600)

    def mark(self, tag: str) -> str:
        record_execution(tag)
        return tag

    def add(self, a: int, b: int = 0) -> int:
        return a + b

    def fail(self, message: str) -> None:
        raise ValueError(message)


@deployment(max_ongoing_requests=100)
class AsyncWork:
    async def double(self, x: int) -> int:
        await asyncio.sleep(0.002 * (x % 7))  # finish out of order, so map() must put results back in order
        return 2 * x

    async def stoppable(self, tag: str) -> str:
        """Runs until cancelled (or a minute passes), and says which happened."""
        record_execution(tag)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await _aredis().set(stopped_key(tag), 1, ex=600)
            raise
        return "ran to the end"


ShortLived = Gate.options(
    name="ShortLived", request_timeout_s=1.5, job_retention_s=2, request_retention_s=2, max_queued_requests=1
)


@deployment(num_replicas=1)
class Crashy:
    def work(self, tag: str) -> dict[str, int]:
        """The first run blocks (the test kills its replica); the redelivered run returns at once."""
        run = record_execution(tag)
        if run == 1:
            wait_for_release(tag)
        return {"pid": os.getpid(), "run": run}


@deployment(request_retention_s=5)
class Front:
    """The HTTP ingress; its sync requests are kept 5 s after they finish."""

    def __init__(self, *handles: DeploymentHandle) -> None:
        self.handles = handles

    async def __call__(self, request: Request) -> dict[str, Any]:
        body = await request.body()
        return {
            "method": request.method,
            "path": request.url.path,
            "query": dict(request.query_params),
            "json": await request.json() if body else None,
            "pid": os.getpid(),
        }

    async def slow(self, request: Request) -> dict[str, Any]:
        """Answers once the test releases `?tag=`."""
        tag = request.query_params["tag"]
        record_execution(tag)
        await _aredis().blpop([release_key(tag)], timeout=HOLD_TIMEOUT_S)
        return {"tag": tag, "json": await request.json()}


app = Front.bind(Gate.bind(), AsyncWork.bind(), ShortLived.bind(), Crashy.bind())


# --- test side: used by the tests in their own process, never by a replica ---------------------------

_deployed_to: str | None = None


def deploy(redis_url: str) -> None:
    """Run the `jobs` application in the test session (once per session's Redis)."""
    global _deployed_to
    if _deployed_to != redis_url:
        from celery_serve import run

        run(app, name=APP_NAME, route_prefix=ROUTE_PREFIX, redis_url=redis_url, startup_timeout_s=150)
        _deployed_to = redis_url


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def executions(client: redis.Redis, tag: str) -> int:
    return int(client.get(executions_key(tag)) or 0)


def job_status(http: httpx.Client, job_id: str) -> str:
    return str(http.get(f"/jobs/{job_id}").json()["status"])


def submit(http: httpx.Client, target: str, *args: Any, headers: dict[str, str] | None = None) -> str:
    """POST /jobs/<target> with these arguments; returns the job id."""
    response = http.post(f"/jobs/{target}", params={"app": APP_NAME}, json={"args": list(args)}, headers=headers)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def finished(http: httpx.Client, job_id: str, wait_s: float = 60.0) -> dict[str, Any]:
    """Long-poll the job until it ends (fails the test if it does not end within `wait_s`)."""
    response = http.get(f"/jobs/{job_id}", params={"wait": wait_s})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] in ("succeeded", "failed", "cancelled", "expired"), job
    return dict(job)


@contextlib.contextmanager
def held(http: httpx.Client, client: redis.Redis, deployment: str = "Gate") -> Iterator[str]:
    """Keep a single-replica deployment busy (its replica runs `hold`); yields the hold job's id.

    On the way out the hold is released and the deployment left idle with an empty queue, so the next
    test finds it as this one did.
    """
    from tests.conftest import wait_until

    tag = unique("hold")
    job_id = submit(http, f"{deployment}/hold", tag)
    try:
        status = wait_until(
            lambda: (s := job_status(http, job_id)) != "queued" and s, what=f"{deployment} to take the hold"
        )
        assert status == "running", f"the hold job on {deployment} is {status}, not running"
        wait_until(lambda: executions(client, tag) == 1, what="the hold to start")
        yield job_id
    finally:
        client.rpush(release_key(tag), 1)
        client.expire(release_key(tag), 600)
        if executions(client, tag):
            wait_until(lambda: client.exists(done_key(tag)), what=f"the hold on {deployment} to return")
        queue = _keys.queue(APP_NAME, deployment)
        wait_until(lambda: client.llen(queue) == 0, what=f"{deployment}'s queue to drain")
