"""Jobs started from the blocking pop read `running` only once they last (workers.running_marks), on a real Redis."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
import redis

from celery_serve._wire import keys as _keys
from celery_serve.workers import running_marks
from celery_serve.workers.running_marks import MARK_AFTER_S, RunningMarks
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


def test_a_request_answered_at_once_is_never_marked_and_its_answer_gets_its_start(
    marks: RunningMarks, redis_client: redis.Redis
) -> None:
    (job_id,) = _queued_jobs(redis_client, 1)
    before = time.time()
    marks.started(job_id, deadline=None)
    started = marks.answered(job_id)
    assert isinstance(started, float) and before <= started <= time.time()
    time.sleep(MARK_AFTER_S * 3)
    assert redis_client.hget(_keys.job(job_id), "status") == b"queued"  # no mark went out
    assert marks.answered(job_id) == ""  # nothing pending any more


def test_requests_that_last_are_marked_running_with_when_they_started(
    marks: RunningMarks, redis_client: redis.Redis
) -> None:
    ids = _queued_jobs(redis_client, 3)
    before = time.time()
    for job_id in ids:
        marks.started(job_id, deadline=None)
    redis_client.hset(_keys.job(ids[2]), "status", "cancelled")  # ended meanwhile: keeps its state
    wait_until(lambda: redis_client.hget(_keys.job(ids[1]), "status") == b"running", timeout_s=5, what="the marks")
    for job_id in ids[:2]:
        status, started = redis_client.hmget(_keys.job(job_id), "status", "started_at")
        assert status == b"running" and before <= float(started) < before + MARK_AFTER_S
    assert redis_client.hget(_keys.job(ids[2]), "status") == b"cancelled"
    assert marks.answered(ids[0]) == ""  # marked: the answer leaves started_at as the mark wrote it


def test_a_request_near_its_deadline_is_marked_at_once(
    marks: RunningMarks, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """So that a reader never takes it for a request that expired in the queue (marks made to wait 60 s here:
    only the one near its deadline goes out)."""
    monkeypatch.setattr(running_marks, "MARK_AFTER_S", 60.0)
    near, far = _queued_jobs(redis_client, 2)
    marks.started(far, deadline=time.time() + 600)
    marks.started(near, deadline=time.time() + 0.5)
    wait_until(lambda: redis_client.hget(_keys.job(near), "status") == b"running", timeout_s=5, what="the mark")
    assert redis_client.hget(_keys.job(far), "status") == b"queued"
