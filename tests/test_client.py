"""The Python client, over HTTP (through the gateway) and straight onto Redis: the same tests on both.

`Client("http://...")` and `Client(redis_url=...)` must behave alike: same results, same job records,
same exceptions. Runs against the `jobs` application of `tests/job_deployments.py`.
"""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from celery_serve import (
    AsyncClient,
    BackpressureError,
    Client,
    DeploymentNotFoundError,
    Job,
    JobCancelledError,
    RemoteError,
    RequestTimeoutError,
    ServeError,
    get_deployment_handle,
)
from celery_serve._runtime.launcher import child_env
from tests import job_deployments as jd
from tests.conftest import Served

pytestmark = pytest.mark.timeout(180)

TRANSPORTS = ["http", "redis"]


@pytest.fixture(scope="module")
def jobs(served: Served) -> Served:
    jd.deploy(served.redis_url)
    return served


def _make_client(served: Served, transport: str) -> Client:
    if transport == "http":
        return Client(served.gateway_url, app=jd.APP_NAME)
    return Client(redis_url=served.redis_url, app=jd.APP_NAME)


@pytest.fixture(scope="module")
def clients(jobs: Served) -> Iterator[dict[str, Client]]:
    made = {transport: _make_client(jobs, transport) for transport in TRANSPORTS}
    yield made
    for client in made.values():
        client.close()


@pytest.fixture(params=TRANSPORTS)
def client(request: pytest.FixtureRequest, clients: dict[str, Client]) -> Client:
    return clients[request.param]


@pytest.fixture(scope="module")
def http(jobs: Served) -> Iterator[httpx.Client]:
    with jobs.http() as raw:
        yield raw


@pytest.fixture
def r(jobs: Served) -> Iterator[redis.Redis]:
    raw = redis.Redis.from_url(jobs.redis_url)
    yield raw
    raw.close()


# --- call, submit, jobs --------------------------------------------------------------------------------


def test_call_returns_the_result(client: Client) -> None:
    assert client.call("Gate.add", 2, b=3) == 5
    assert client.call("jobs:AsyncWork.double", 4) == 8  # "app:Deployment.method" names the application


def test_submit_returns_a_job_with_status_and_result(client: Client, r: redis.Redis) -> None:
    tag = jd.unique("client-submit")
    job = client.submit("Gate.mark", tag)
    assert isinstance(job, Job)
    assert str(uuid.UUID(job.id)) == job.id
    assert job.status() in ("queued", "running", "succeeded")
    assert job.result(timeout_s=60) == tag
    assert job.status() == "succeeded"
    info = job.info()
    assert (info["job_id"], info["deployment"], info["method"], info["result"]) == (
        job.id,
        "Gate",
        "mark",
        tag,
    )
    assert client.job(job.id).result(timeout_s=5) == tag  # found again by id
    assert jd.executions(r, tag) == 1


def test_a_job_submitted_over_one_transport_is_read_over_the_other(clients: dict[str, Client]) -> None:
    over_http = clients["http"].submit("Gate.add", 1, 1)
    over_redis = clients["redis"].submit("Gate.add", 2, 2)
    assert clients["redis"].job(over_http.id).result(timeout_s=60) == 2
    assert clients["http"].job(over_redis.id).result(timeout_s=60) == 4
    assert clients["http"].job(over_http.id).info() == clients["redis"].job(over_http.id).info()


def test_cancel_a_queued_job(client: Client, http: httpx.Client, r: redis.Redis) -> None:
    tag, fence = jd.unique("client-cancel"), jd.unique("fence")
    with jd.held(http, r):
        job = client.submit("Gate.mark", tag)
        assert job.status() == "queued"
        with pytest.raises(RequestTimeoutError):
            job.result(timeout_s=0.2)  # still queued behind the held replica
        assert job.cancel()["status"] == "cancelled"
        with pytest.raises(JobCancelledError):
            job.result(timeout_s=10)
    assert client.call("Gate.mark", fence) == fence  # the replica takes jobs in order: ours was passed over
    assert jd.executions(r, tag) == 0
    assert job.status() == "cancelled"


def test_an_idempotency_key_returns_the_same_job(client: Client, r: redis.Redis) -> None:
    tag, key = jd.unique("client-idem"), jd.unique("key")
    first = client.submit("Gate.mark", tag, idempotency_key=key)
    again = client.submit("Gate.mark", tag, idempotency_key=key)
    assert again.id == first.id
    assert first.result(timeout_s=60) == again.result(timeout_s=60) == tag
    assert jd.executions(r, tag) == 1


# --- map -----------------------------------------------------------------------------------------------


def test_map_returns_results_in_order(client: Client) -> None:
    items = list(range(40))  # AsyncWork.double finishes them out of order
    assert client.map("AsyncWork.double", items, concurrency=6) == [2 * i for i in items]
    assert client.map("AsyncWork.double", [], concurrency=2) == []


def test_map_raises_an_error_once_all_calls_ended(client: Client) -> None:
    with pytest.raises(RemoteError) as info:
        client.map("Gate.fail", ["first", "second"], concurrency=1)
    assert info.value.remote_message == "first"
    with pytest.raises(ServeError, match="concurrency"):
        client.map("AsyncWork.double", [1], concurrency=0)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stderr", "progress", "shown"),
    [
        (io.StringIO, None, False),  # not a terminal: no bar unless asked
        (io.StringIO, True, True),
        (_Terminal, None, True),  # a terminal: a bar unless told not to
        (_Terminal, False, False),
    ],
)
def test_map_progress_bar(
    clients: dict[str, Client],
    monkeypatch: pytest.MonkeyPatch,
    stderr: type[io.StringIO],
    progress: Any,
    shown: bool,
) -> None:
    err = stderr()
    monkeypatch.setattr(sys, "stderr", err)
    assert clients["redis"].map("AsyncWork.double", range(5), concurrency=2, progress=progress) == [
        0,
        2,
        4,
        6,
        8,
    ]
    output = err.getvalue()
    if shown:
        assert "AsyncWork.double" in output and "5/5" in output
    else:
        assert output == ""


# --- errors: the project's exceptions, the same whichever transport ------------------------------------


def test_unknown_deployments_and_methods_raise_not_found(client: Client) -> None:
    with pytest.raises(DeploymentNotFoundError):
        client.call("NoSuchDeployment", 1)
    with pytest.raises(DeploymentNotFoundError):
        client.submit("NoSuchDeployment", 1)
    with pytest.raises(DeploymentNotFoundError, match="no method 'nope'"):
        client.call("Gate.nope")


def test_user_errors_raise_remote_error_with_the_remote_type_and_message(client: Client) -> None:
    with pytest.raises(RemoteError) as info:
        client.call("Gate.fail", "bad input")
    error = info.value
    assert (error.remote_type, error.remote_message, error.deployment) == ("ValueError", "bad input", "Gate")
    with pytest.raises(RemoteError) as from_job:
        client.submit("Gate.fail", "later").result(timeout_s=60)
    assert (from_job.value.remote_type, from_job.value.remote_message) == ("ValueError", "later")


def test_deadline_and_full_queue_raise_timeout_and_backpressure(
    client: Client, http: httpx.Client, r: redis.Redis
) -> None:
    tag = jd.unique("client-deadline")
    with jd.held(http, r, "ShortLived"):  # request_timeout_s=1.5, max_queued_requests=1
        with pytest.raises(RequestTimeoutError):
            client.call("ShortLived.mark", tag)  # waits in the queue past its deadline
        # its expired message still fills the one-request queue
        with pytest.raises(BackpressureError):
            client.submit("ShortLived.mark", tag)
    assert jd.executions(r, tag) == 0


# --- handles from outside a deployment -----------------------------------------------------------------


def test_get_deployment_handle_in_this_process(jobs: Served) -> None:
    handle = get_deployment_handle("Gate", app_name=jd.APP_NAME)
    assert handle.add.remote(1, b=2).result(timeout_s=60) == 3


def test_get_deployment_handle_in_a_process_that_has_only_redis_url(jobs: Served) -> None:
    code = (
        "from celery_serve import get_deployment_handle\n"
        "print(get_deployment_handle('AsyncWork', app_name='jobs').double.remote(21).result(timeout_s=60))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env({"REDIS_URL": jobs.redis_url}),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "42"


# --- AsyncClient ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_async_client(jobs: Served, transport: str) -> None:
    async def main() -> tuple[Any, ...]:
        address = {"url": jobs.gateway_url} if transport == "http" else {"redis_url": jobs.redis_url}
        async with AsyncClient(**address, app=jd.APP_NAME) as client:
            called = await client.call("Gate.add", 20, b=1)
            job = await client.submit("AsyncWork.double", 50)
            result = await job.result(timeout_s=60)
            status = await job.status()
            mapped = await client.map("AsyncWork.double", [1, 2, 3], concurrency=2)
            with pytest.raises(RemoteError):
                await client.call("Gate.fail", "async too")
            return called, result, status, mapped

    assert asyncio.run(main()) == (21, 100, "succeeded", [2, 4, 6])


def test_a_client_needs_exactly_one_address() -> None:
    with pytest.raises(ServeError, match="not both"):
        AsyncClient()
    with pytest.raises(ServeError, match="not both"):
        AsyncClient("http://127.0.0.1:1", redis_url="redis://127.0.0.1:1")
