"""Jobs started from the blocking pop are marked `running` off the event loop (workers.running_marks), on a real
Redis: promptly, several per call, never over a final state, and never losing when the request started."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from celery_serve._wire import keys as _keys
from celery_serve.workers.running_marks import RunningMarks
from tests.conftest import wait_until


@pytest.fixture
def marks(redis_url: str) -> Iterator[RunningMarks]:
    found = RunningMarks(redis_url)
    yield found
    found.close()


def _queued_jobs(r: redis.Redis, n: int) -> list[str]:
    ids = [f"marks-{uuid.uuid4().hex[:10]}" for _ in range(n)]
    for job_id in ids:
        r.hset(_keys.job(job_id), mapping={"status": "queued", "created_at": time.time()})
        r.expire(_keys.job(job_id), 60)
    return ids


def test_started_requests_read_running_with_when_they_started(marks: RunningMarks, redis_client: redis.Redis) -> None:
    ids = _queued_jobs(redis_client, 3)
    before = time.time()
    for job_id in ids:
        marks.started(job_id)
    wait_until(lambda: redis_client.hget(_keys.job(ids[2]), "status") == b"running", timeout_s=5, what="the marks")
    for job_id in ids:
        status, started = redis_client.hmget(_keys.job(job_id), "status", "started_at")
        assert status == b"running" and before <= float(started) <= time.time()
    assert marks.answered(ids[0]) == ""  # the mark went out: it recorded the start


def test_a_mark_never_overwrites_a_final_state_but_fills_in_the_start(
    marks: RunningMarks, redis_client: redis.Redis
) -> None:
    """The answer got there first (the mark was on its way): the job stays succeeded, and reads when it started."""
    (job_id,) = _queued_jobs(redis_client, 1)
    redis_client.hset(_keys.job(job_id), "status", "succeeded")
    marks.started(job_id)
    wait_until(lambda: redis_client.hexists(_keys.job(job_id), "started_at"), timeout_s=5, what="the mark")
    assert redis_client.hget(_keys.job(job_id), "status") == b"succeeded"
    marks._send([("marks-never-queued", time.time())])  # a job that does not exist is not created
    assert not redis_client.exists(_keys.job("marks-never-queued"))


def test_a_request_answered_before_its_mark_went_out_gets_its_start_from_the_answer(
    marks: RunningMarks, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    (job_id,) = _queued_jobs(redis_client, 1)
    sending, release = threading.Event(), threading.Event()
    send = marks._send

    def slow_send(ready: list[tuple[str, float]]) -> None:
        sending.set()
        release.wait(5)
        send(ready)

    monkeypatch.setattr(marks, "_send", slow_send)
    marks.started("marks-busy")  # the marker thread is held sending this one
    assert sending.wait(5)
    before = time.time()
    marks.started(job_id)
    started = marks.answered(job_id)  # answered before its mark could go out: the mark is dropped
    assert isinstance(started, float) and before <= started <= time.time()
    release.set()
    time.sleep(0.2)
    assert redis_client.hget(_keys.job(job_id), "status") == b"queued"  # no mark went out for it
