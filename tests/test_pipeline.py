"""Composition: pipelines run as Celery chains worker to worker, fan-out/fan-in, errors and deadlines that
travel, every entry point (HTTP, handle, job, client); and handle graphs that do not deadlock."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
import redis

import celery_serve as serve
from celery_serve import Client, DeploymentHandle, RemoteError, RequestTimeoutError
from tests import pipeline_deployments as pd
from tests.conftest import STARTUP_TIMEOUT_S, Served, wait_until
from tests.deployments import executions_key


@pytest.fixture(scope="module")
def pipes(served: Served) -> Iterator[dict[str, DeploymentHandle]]:
    apps = {
        "chain": pd.chain_app,
        "late": pd.late_app,
        "fan": pd.fan_app,
        "fanfirst": pd.fan_first_app,
        "graph": pd.graph_app,
    }
    handles = {
        name: serve.run(application, name=name, route_prefix=f"/{name}", startup_timeout_s=STARTUP_TIMEOUT_S)
        for name, application in apps.items()
    }
    yield handles


def executions(served: Served, tag: str) -> int:
    return int(redis.Redis.from_url(served.redis_url).get(executions_key(tag)) or 0)


def test_chain_through_a_handle(pipes: dict[str, DeploymentHandle]) -> None:
    assert pipes["chain"].remote("hi").result(timeout_s=30) == {"result": "HI!", "length": 3}


def test_chain_over_http_gets_the_request_first_and_answers_json(
    served: Served, pipes: dict[str, DeploymentHandle]
) -> None:
    with served.http() as http:
        response = http.get("/chain/", params={"text": "hello"})
    assert response.status_code == 200
    assert response.json() == {"result": "HELLO!", "length": 6}
    assert response.headers["content-type"] == "application/json"


def test_routes_show_the_pipeline(served: Served, pipes: dict[str, DeploymentHandle]) -> None:
    with served.http() as http:
        routes = http.get("/-/routes").json()
    assert routes["/chain"] == "upper >> Exclaim >> wrap"
    assert routes["/fan"] == "upper >> parallel(length, reverse) >> combine"


def test_intermediate_results_go_worker_to_worker(served: Served, pipes: dict[str, DeploymentHandle]) -> None:
    """Each step runs once per request, and the caller's reply list only ever sees the final result."""
    before = {tag: executions(served, tag) for tag in ("pipe-upper", "pipe-exclaim", "pipe-wrap")}
    results = [pipes["chain"].remote(f"x{i}") for i in range(10)]
    assert [r.result(timeout_s=30)["result"] for r in results] == [f"X{i}!" for i in range(10)]
    after = {tag: executions(served, tag) for tag in before}
    assert after["pipe-upper"] - before["pipe-upper"] == 10
    assert after["pipe-wrap"] - before["pipe-wrap"] == 10
    assert 1 <= after["pipe-exclaim"] - before["pipe-exclaim"] <= 10  # batched: one execution per batch


def test_fan_out_and_in(pipes: dict[str, DeploymentHandle]) -> None:
    assert pipes["fan"].remote("abc").result(timeout_s=30) == {"parts": [3, "CBA"]}


def test_parallel_first_step(pipes: dict[str, DeploymentHandle]) -> None:
    assert pipes["fanfirst"].remote("abcd").result(timeout_s=30) == {"parts": [4, "dcba"]}


def test_failing_step_names_the_step(served: Served, pipes: dict[str, DeploymentHandle]) -> None:
    with pytest.raises(RemoteError) as info:
        pipes["chain"].remote("fail").result(timeout_s=30)
    assert info.value.remote_type == "ValueError"
    assert "step 'upper' failed" in info.value.remote_message
    with served.http() as http:
        response = http.get("/chain/", params={"text": "fail"})
    assert response.status_code == 500
    body = response.json()
    assert body["error"] == "ValueError" and body["deployment"] == "upper"
    assert "step 'upper' failed: refusing to shout 'fail'" == body["message"]
    assert "Traceback" not in response.text


def test_deadline_covers_the_whole_chain(served: Served, pipes: dict[str, DeploymentHandle]) -> None:
    """The first step outlives the request's deadline: the caller gets 504 and the next step never runs."""
    before = executions(served, "pipe-late")
    with served.http() as http:
        response = http.get("/late/", params={"text": "1.5"})
    assert response.status_code == 504
    job_id = response.headers["x-request-id"]
    with served.http() as http:
        job = wait_until(lambda: (j := http.get(f"/jobs/{job_id}").json())["status"] == "expired" and j, 30)
    assert job["error"]["type"] == "RequestTimeoutError"
    assert executions(served, "pipe-late") == before


def test_pipeline_as_a_job(served: Served, pipes: dict[str, DeploymentHandle]) -> None:
    with served.http() as http:
        submitted = http.post("/jobs/chain", json="job")
        assert submitted.status_code == 202
        job = http.get(f"/jobs/{submitted.json()['job_id']}", params={"wait": 30}).json()
    assert job["status"] == "succeeded"
    assert job["result"] == {"result": "JOB!", "length": 4}


@pytest.mark.parametrize("transport", ["http", "redis"])
def test_pipeline_from_the_client(served: Served, pipes: dict[str, DeploymentHandle], transport: str) -> None:
    client = (
        Client(served.gateway_url, app="fan") if transport == "http" else Client(redis_url=served.redis_url, app="fan")
    )
    with client:
        target = "upper >> parallel(length, reverse) >> combine" if transport == "redis" else "fan"
        assert client.call(target, "xy") == {"parts": [2, "YX"]}


def test_handle_graph_depth_three_one_replica_each_does_not_deadlock(pipes: dict[str, DeploymentHandle]) -> None:
    """Root -> Top -> (Middle -> Leaf, Leaf): 40 concurrent calls through single replicas all finish."""
    responses = [pipes["graph"].remote(i) for i in range(40)]
    assert [r.result(timeout_s=60) for r in responses] == [(i + 1) * 2 + (i + 1) for i in range(40)]


def test_async_deployment_keeps_serving_while_it_awaits(served: Served, pipes: dict[str, DeploymentHandle]) -> None:
    top = serve.DeploymentHandle("Top", "graph")

    async def main() -> tuple[str, str]:
        slow = top.slow.remote(3.0)
        await asyncio.sleep(0.2)
        pong = await asyncio.wait_for(_awaited(top.ping.remote()), 2.5)  # answered while `slow` sleeps
        return pong, await slow

    assert asyncio.run(main()) == ("pong", "slow done")


async def _awaited(response: serve.DeploymentResponse) -> str:
    return await response


def test_chain_deadline_through_a_handle_raises_timeout(pipes: dict[str, DeploymentHandle]) -> None:
    with pytest.raises(RequestTimeoutError):
        pipes["late"].remote("1.5").result(timeout_s=30)


def test_bad_pipeline_steps_are_refused() -> None:
    with pytest.raises(serve.DeploymentConfigError, match="at least two"):
        serve.parallel(pd.length.bind())
    with pytest.raises(serve.DeploymentConfigError, match="pipeline step must be a deployment"):
        _ = pd.upper.bind() >> "nope"
    with pytest.raises(serve.DeploymentConfigError, match="at least two steps"):
        serve.pipeline(pd.upper.bind())


def test_pipeline_builders_agree() -> None:
    a, b, c = pd.upper.bind(), pd.length.bind(), pd.reverse.bind()
    left = a >> serve.parallel(b, c) >> pd.combine
    right = serve.pipeline(a, serve.parallel(b, c), pd.combine)
    assert repr(left) == repr(right) == "upper >> parallel(length, reverse) >> combine"


def test_http_client_cannot_reach_unknown_pipeline(served: Served, pipes: dict[str, DeploymentHandle]) -> None:
    with httpx.Client(base_url=served.gateway_url) as http:
        assert http.post("/jobs/nope-no-such-thing", json=1).status_code == 404
