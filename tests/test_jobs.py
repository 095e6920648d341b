"""Jobs over HTTP, end to end: submit, long-poll, cancel, idempotency, retention, and surviving crashes.

Real parts only: the session's redis-server and gateway (`served`), plus the `jobs` application of
`tests/job_deployments.py` in its own Celery workers. Whether work ran is read from Redis keys the
deployments write, so "it never ran" and "it ran once" are observed, not assumed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from celery_serve._runtime.launcher import child_env, free_port
from celery_serve._wire import keys as _keys
from tests import job_deployments as jd
from tests.conftest import Served, wait_until
from tests.deployments import pids_key

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def jobs(served: Served) -> Served:
    jd.deploy(served.redis_url)
    return served


@pytest.fixture(scope="module")
def http(jobs: Served) -> Iterator[httpx.Client]:
    with jobs.http() as client:
        yield client


@pytest.fixture
def r(jobs: Served) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(jobs.redis_url)
    yield client
    client.close()


# --- submit --------------------------------------------------------------------------------------------


def test_submit_answers_202_with_the_job_at_once_even_while_the_replica_is_busy(
    http: httpx.Client, r: redis.Redis
) -> None:
    tag = jd.unique("queued")
    with jd.held(http, r):
        response = http.post("/jobs/Gate/mark", params={"app": "jobs"}, json={"args": [tag]})
        assert response.status_code == 202
        body = response.json()
        job_id = body["job_id"]
        assert str(uuid.UUID(job_id)) == job_id
        assert body["status_url"] == f"/jobs/{job_id}"
        assert response.headers["location"] == body["status_url"]
        queued = http.get(body["status_url"]).json()
        assert queued["status"] == "queued"
        assert (queued["application"], queued["deployment"], queued["method"]) == ("jobs", "Gate", "mark")
        assert queued["created_at"] and queued["started_at"] is None and "result" not in queued
        assert jd.executions(r, tag) == 0
    job = jd.finished(http, job_id)
    assert (job["status"], job["result"]) == ("succeeded", tag)
    assert job["created_at"] <= job["started_at"] <= job["finished_at"]
    assert jd.executions(r, tag) == 1


def test_submit_by_deployment_name_takes_args_and_kwargs_or_one_json_value(http: httpx.Client) -> None:
    with_kwargs = http.post("/jobs/Gate/add", params={"app": "jobs"}, json={"args": [2], "kwargs": {"b": 40}})
    one_value = http.post("/jobs/AsyncWork/double", json=21)  # unique names need no ?app=
    assert (with_kwargs.status_code, one_value.status_code) == (202, 202)
    assert jd.finished(http, with_kwargs.json()["job_id"])["result"] == 42
    assert jd.finished(http, one_value.json()["job_id"])["result"] == 42


def test_submit_to_a_route_carries_the_same_http_request_as_a_sync_call(http: httpx.Client) -> None:
    response = http.post("/jobs/-/jobtest/items/7", params={"color": "red"}, json={"n": 1})
    assert response.status_code == 202
    job = jd.finished(http, response.json()["job_id"])
    assert job["status"] == "succeeded" and job["status_code"] == 200
    result = job["result"]
    assert (result["method"], result["path"], result["json"]) == ("POST", "/jobtest/items/7", {"n": 1})
    assert result["query"]["color"] == "red"
    sync = http.post("/jobtest/items/7", params={"color": "red"}, json={"n": 1}).json()
    assert {k: sync[k] for k in ("method", "path", "json")} == {k: result[k] for k in ("method", "path", "json")}

    put = http.post("/jobs/-/jobtest", headers={"X-HTTP-Method-Override": "PUT"})
    assert jd.finished(http, put.json()["job_id"])["result"]["method"] == "PUT"


def test_submit_to_nothing_is_404_and_an_unreadable_body_is_400(http: httpx.Client) -> None:
    missing = http.post("/jobs/NoSuchDeployment", json=1)
    assert missing.status_code == 404
    assert missing.json()["error"] == "DeploymentNotFoundError"
    assert "jobs:Gate" in missing.json()["deployments"]
    assert http.post("/jobs/-/no/such/route", json=1).status_code == 404
    bad = http.post("/jobs/Gate/mark", params={"app": "jobs"}, content=b"{not json")
    assert bad.status_code == 400
    assert bad.json()["error"] == "BadRequestError"


def test_a_failed_job_reports_the_error(http: httpx.Client) -> None:
    job = jd.finished(http, jd.submit(http, "Gate/fail", "broken on purpose"))
    assert job["status"] == "failed"
    assert job["error"] == {"type": "ValueError", "message": "broken on purpose"}
    assert "result" not in job


# --- long-poll -----------------------------------------------------------------------------------------


def test_long_poll_subscribes_and_wakes_when_the_job_ends(jobs: Served, http: httpx.Client, r: redis.Redis) -> None:
    tag = jd.unique("poll")
    job_id = jd.submit(http, "Gate/hold", tag)
    answers: list[dict[str, Any]] = []
    try:
        wait_until(lambda: jd.executions(r, tag) == 1, what="the job to start")
        short = http.get(f"/jobs/{job_id}", params={"wait": 0.2})
        assert short.json()["status"] == "running"  # the wait ran out: the job as it is now

        def long_poll() -> None:
            with jobs.http() as own:
                answers.append(own.get(f"/jobs/{job_id}", params={"wait": 120}).json())

        poller = threading.Thread(target=long_poll)
        poller.start()
        channel = _keys.result(job_id)
        wait_until(lambda: dict(r.pubsub_numsub(channel)).get(channel.encode(), 0) > 0, what="a subscriber")
        assert not answers
    finally:
        r.rpush(jd.release_key(tag), 1)
    poller.join(timeout=60)  # far less than the 120 s asked for: woken by the result, not by the timeout
    assert not poller.is_alive()
    assert answers[0]["status"] == "succeeded" and answers[0]["result"] == "released"


# --- cancel --------------------------------------------------------------------------------------------


def test_cancelling_a_queued_job_means_it_never_runs(http: httpx.Client, r: redis.Redis) -> None:
    tag, fence = jd.unique("cancelled"), jd.unique("fence")
    with jd.held(http, r):
        job_id = jd.submit(http, "Gate/mark", tag)
        assert jd.job_status(http, job_id) == "queued"
        response = http.delete(f"/jobs/{job_id}")
        assert response.status_code == 200
        assert (response.json()["status"], response.json()["was"]) == ("cancelled", "queued")
    # the single replica is free again and takes jobs in order: once a later job ran, the cancelled one
    # would have run before it
    assert jd.finished(http, jd.submit(http, "Gate/mark", fence))["status"] == "succeeded"
    assert jd.executions(r, fence) == 1
    assert jd.executions(r, tag) == 0
    job = http.get(f"/jobs/{job_id}").json()
    assert job["status"] == "cancelled"
    assert job["error"]["type"] == "JobCancelledError"


def test_cancelling_running_async_work_stops_it(http: httpx.Client, r: redis.Redis) -> None:
    tag = jd.unique("stoppable")
    job_id = jd.submit(http, "AsyncWork/stoppable", tag)
    wait_until(lambda: jd.executions(r, tag) == 1, what="the job to start")
    assert jd.job_status(http, job_id) == "running"
    response = http.delete(f"/jobs/{job_id}")
    assert (response.json()["status"], response.json()["was"]) == ("cancelled", "running")
    wait_until(lambda: r.exists(jd.stopped_key(tag)), what="the running coroutine to be cancelled")
    job = jd.finished(http, job_id)
    assert job["status"] == "cancelled" and "result" not in job


def test_cancelling_running_sync_work_ends_the_job_and_its_late_result_is_dropped(
    http: httpx.Client, r: redis.Redis
) -> None:
    with jd.held(http, r) as hold_id:
        assert http.delete(f"/jobs/{hold_id}").json()["status"] == "cancelled"
    # the hold returned "released" after the cancel: the first terminal state stays
    job = http.get(f"/jobs/{hold_id}").json()
    assert job["status"] == "cancelled" and "result" not in job
    assert json.loads(r.get(_keys.result(hold_id)))["result"]["exc_type"] == "JobCancelledError"


def test_cancel_after_the_end_is_409_and_unknown_or_malformed_ids_are_404_and_400(http: httpx.Client) -> None:
    job_id = jd.submit(http, "Gate/add", 1, 2)
    assert jd.finished(http, job_id)["status"] == "succeeded"
    late = http.delete(f"/jobs/{job_id}")
    assert late.status_code == 409 and "already succeeded" in late.text
    assert jd.job_status(http, job_id) == "succeeded"

    unknown = str(uuid.uuid4())
    for response in (
        http.get(f"/jobs/{unknown}"),
        http.get(f"/jobs/{unknown}?wait=1"),
        http.delete(f"/jobs/{unknown}"),
    ):
        assert response.status_code == 404
        assert response.json()["error"] == "DeploymentNotFoundError" and unknown in response.json()["message"]
    for response in (http.get("/jobs/not!a:job-id"), http.delete("/jobs/-not-a-job-id")):  # see X-Request-ID rules
        assert response.status_code == 400
        assert "not a job id" in response.json()["message"]


# --- idempotency ---------------------------------------------------------------------------------------


def test_a_repeated_idempotency_key_returns_the_same_job_and_runs_it_once(http: httpx.Client, r: redis.Redis) -> None:
    tag = jd.unique("idem")
    key = {"Idempotency-Key": jd.unique("key")}
    first = http.post("/jobs/Gate/mark", params={"app": "jobs"}, json={"args": [tag]}, headers=key)
    again = http.post("/jobs/Gate/mark", params={"app": "jobs"}, json={"args": [tag]}, headers=key)
    assert (first.status_code, again.status_code) == (202, 202)
    assert again.json()["job_id"] == first.json()["job_id"]
    assert again.headers.get("idempotent-replayed") == "true" and "idempotent-replayed" not in first.headers
    assert jd.finished(http, first.json()["job_id"])["result"] == tag
    after = http.post("/jobs/Gate/mark", params={"app": "jobs"}, json={"args": [tag]}, headers=key)
    assert after.json()["job_id"] == first.json()["job_id"] and after.json()["status"] == "succeeded"
    assert jd.executions(r, tag) == 1

    other = jd.submit(http, "Gate/mark", tag, headers={"Idempotency-Key": jd.unique("key")})
    assert other != first.json()["job_id"]
    assert jd.finished(http, other)["status"] == "succeeded"
    assert jd.executions(r, tag) == 2


# --- retention and deadlines ---------------------------------------------------------------------------


def test_a_finished_job_is_gone_after_its_retention_period(http: httpx.Client) -> None:
    job_id = jd.submit(http, "ShortLived/mark", jd.unique("retained"))  # job_retention_s=2
    assert jd.finished(http, job_id)["status"] == "succeeded"
    gone = wait_until(lambda: (g := http.get(f"/jobs/{job_id}")).status_code == 404 and g, timeout_s=30, what="404")
    assert "retention" in gone.json()["message"]


def test_a_queued_job_past_its_deadline_reads_expired_and_never_runs(http: httpx.Client, r: redis.Redis) -> None:
    tag, fence = jd.unique("expired"), jd.unique("fence")
    with jd.held(http, r, "ShortLived"):  # request_timeout_s=1.5, and nothing is taken while held
        job_id = jd.submit(http, "ShortLived/mark", tag)
        job = jd.finished(http, job_id)  # a long-poll: woken at the deadline, not left queued
        assert job["status"] == "expired"
        assert job["error"]["type"] == "RequestTimeoutError"
    assert jd.finished(http, jd.submit(http, "ShortLived/mark", fence))["status"] == "succeeded"
    assert jd.executions(r, tag) == 0
    wait_until(lambda: http.get(f"/jobs/{job_id}").status_code == 404, timeout_s=30, what="the expired job to go")


# --- every synchronous request is a job ----------------------------------------------------------------


def test_a_sync_request_is_a_job_with_its_id_in_x_request_id(http: httpx.Client) -> None:
    response = http.get("/jobtest/hello", params={"x": "1"})
    assert response.status_code == 200
    job_id = response.headers["x-request-id"]
    job = http.get(f"/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["status_code"] == 200
    assert job["result"] == response.json()
    # kept for the ingress's request_retention_s (5 s), then a clear 404
    wait_until(lambda: http.get(f"/jobs/{job_id}").status_code == 404, timeout_s=30, what="the request to go")


def test_prefer_respond_async_answers_202_when_not_done_in_time_and_the_job_finishes(
    http: httpx.Client, r: redis.Redis
) -> None:
    tag = jd.unique("spill")
    headers = {"X-Serve-Call-Method": "slow", "Prefer": "respond-async, wait=0.2"}
    try:
        response = http.post("/jobtest", params={"tag": tag}, json={"n": 5}, headers=headers)
        assert response.status_code == 202
        job_id = response.json()["job_id"]
        assert response.headers["x-request-id"] == job_id
        assert response.headers["location"] == response.json()["status_url"] == f"/jobs/{job_id}"
        assert jd.job_status(http, job_id) in ("queued", "running")
    finally:
        r.rpush(jd.release_key(tag), 1)
    job = jd.finished(http, job_id)
    assert (job["status"], job["result"]) == ("succeeded", {"tag": tag, "json": {"n": 5}})

    quick = http.post("/jobtest", json={"n": 6}, headers={"Prefer": "respond-async, wait=30"})
    assert quick.status_code == 200 and quick.json()["json"] == {"n": 6}  # done in time: answered directly


# --- crashes -------------------------------------------------------------------------------------------


def _start_gateway(redis_url: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [sys.executable, "-m", "celery_serve", "gateway", "--port", str(port), "--redis-url", redis_url]
    proc = subprocess.Popen(cmd, env=child_env())
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, "the gateway exited"
        try:
            return httpx.get(f"{url}/-/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout_s=60, interval_s=0.1, what="the extra gateway")
    return proc, url


def test_jobs_survive_a_gateway_restart(jobs: Served, r: redis.Redis) -> None:
    tag = jd.unique("restart")
    first, url = _start_gateway(jobs.redis_url)
    try:
        with httpx.Client(base_url=url, timeout=60) as gateway, jd.held(gateway, r) as hold_id:
            queued_id = jd.submit(gateway, "Gate/mark", tag)
            assert jd.job_status(gateway, queued_id) == "queued"
            first.kill()  # SIGKILL: nothing is handed over
            first.wait()
        # the jobs ran with no gateway up (held() waited for the queue to drain)
    finally:
        first.kill()
        first.wait()
    second, url = _start_gateway(jobs.redis_url)
    try:
        with httpx.Client(base_url=url, timeout=60) as gateway:
            assert jd.finished(gateway, queued_id)["result"] == tag
            assert jd.finished(gateway, hold_id)["result"] == "released"
    finally:
        second.terminate()
        second.wait(timeout=30)
    assert jd.executions(r, tag) == 1


def test_a_replica_killed_mid_job_is_redelivered_and_the_job_ends_once(http: httpx.Client, r: redis.Redis) -> None:
    tag = jd.unique("crash")
    job_id = jd.submit(http, "Crashy/work", tag)
    try:
        wait_until(lambda: jd.executions(r, tag) == 1, what="the job to start")
        pid = int(r.lindex(pids_key(tag), 0))
        replica_pids = {json.loads(raw)["pid"] for raw in r.hvals(_keys.replicas("jobs", "Crashy"))}
        assert pid in replica_pids
        os.kill(pid, signal.SIGKILL)
        job = jd.finished(http, job_id, wait_s=120)
    finally:
        r.rpush(jd.release_key(tag), 1)
        r.expire(jd.release_key(tag), 600)
    assert job["status"] == "succeeded"
    assert job["result"]["run"] == 2 and job["result"]["pid"] != pid  # the second run, in a new replica
    assert jd.executions(r, tag) == 2
    assert r.hget(_keys.job(job_id), "status") == b"succeeded"
    record = json.loads(r.get(_keys.result(job_id)))
    assert record["status"] == "SUCCESS" and record["result"] == job["result"]
