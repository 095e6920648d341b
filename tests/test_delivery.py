"""Wire format and delivery: pickle is never decoded, messages are acknowledged after the work (a killed
replica's request runs again), and every message carries its deadline."""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import time
import uuid
from pathlib import Path

import pytest
import redis

from celery_serve import DeploymentHandle, RequestTimeoutError, deployment
from celery_serve._runtime.serve import delete_app, deploy_spec
from celery_serve._runtime.spec import build_spec
from celery_serve._wire.envelope import build_message, parse_message
from celery_serve._wire.keys import dead_letters, queue, replica_claim, replica_inflight, replicas, result
from tests.conftest import Served, wait_until
from tests.deployments import executions_key, pids_key


class _Trap:
    """Unpickling this creates a directory: proof that a pickle body was (or was not) decoded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, ...]:
        return (os.mkdir, (self.path,))


def _held_by(client: redis.Redis, app: str, dep: str, replica_id: str) -> list[bytes]:
    """What a replica has taken and not acknowledged: its in-flight hash and its claim list."""
    return [
        *client.hvals(replica_inflight(app, dep, replica_id)),
        *client.lrange(replica_claim(app, dep, replica_id), 0, -1),
    ]


def _inflight_messages(client: redis.Redis, app: str, dep: str) -> list[bytes]:
    held = []
    for replica_id in client.hkeys(replicas(app, dep)):
        held.extend(_held_by(client, app, dep, replica_id.decode()))
    return held


def test_a_pickle_message_is_refused_unread_dead_lettered_and_the_replica_keeps_serving(
    served: Served, redis_client: redis.Redis, tmp_path: Path
) -> None:
    marker = tmp_path / "unpickled"
    task_id = f"pickle-{uuid.uuid4().hex}"
    message = json.loads(build_message(task_id=task_id, app="probe", deployment="Calc", method="add", args=[1, 2]))
    message["content-type"] = "application/x-python-serialize"
    message["content-encoding"] = "binary"
    message["body"] = base64.b64encode(pickle.dumps(([_Trap(str(marker))], {}, {}))).decode()
    redis_client.lpush(queue("probe", "Calc"), json.dumps(message))

    # One replica takes messages in order: once a later request is answered, the pickle one was handled.
    assert DeploymentHandle("Calc", "probe").add.remote(2, 2).result(timeout_s=60) == 4
    assert not marker.exists(), "the pickle body was unpickled"
    assert redis_client.llen(queue("probe", "Calc")) == 0
    assert not any(task_id.encode() in m for m in _inflight_messages(redis_client, "probe", "Calc"))
    # Not run, not silently dropped: the caller learns at once why, and the message is kept for inspection.
    record = json.loads(redis_client.get(result(task_id)))
    assert record["status"] == "FAILURE" and record["http_status"] == 400
    assert "only JSON is accepted" in record["result"]["exc_message"]
    entry = json.loads(redis_client.lindex(dead_letters("probe", "Calc"), 0))
    assert entry["job_id"] == task_id and "application/x-python-serialize" in entry["message"]


def test_a_request_whose_replica_is_killed_is_delivered_again_and_succeeds(
    served: Served, redis_client: redis.Redis
) -> None:
    registered = {
        json.loads(v)["pid"]: k.decode() for k, v in redis_client.hgetall(replicas("probe", "Fragile")).items()
    }
    tag = f"kill-{uuid.uuid4().hex[:8]}"
    response = DeploymentHandle("Fragile", "probe").work.remote(tag, 3.0)
    first_pid = int(wait_until(lambda: redis_client.lindex(pids_key(tag), 0), what="the request to start"))
    assert first_pid in registered, f"pid {first_pid} is not one of the registered replicas {registered}"
    # Taken but not acknowledged while it runs: the replica holds the message until it is done.
    held = _held_by(redis_client, "probe", "Fragile", registered[first_pid])
    assert any(tag.encode() in m for m in held)

    os.kill(first_pid, signal.SIGKILL)
    second_pid = response.result(timeout_s=120)

    assert second_pid != first_pid
    assert [int(p) for p in redis_client.lrange(pids_key(tag), 0, -1)] == [first_pid, second_pid]
    assert redis_client.get(executions_key(tag)) == b"2"
    new_replicas = {json.loads(v)["pid"] for v in redis_client.hvals(replicas("probe", "Fragile"))}
    assert second_pid in new_replicas and first_pid not in new_replicas
    assert _inflight_messages(redis_client, "probe", "Fragile") == []


@deployment(request_timeout_s=1.5)
class Unserved:
    """Deployed without workers, so a handle's message stays on the queue to be read."""


def test_a_handle_call_carries_its_deadline_as_the_expires_header(served: Served, redis_client: redis.Redis) -> None:
    deploy_spec(served.redis_url, build_spec(Unserved.bind(), "unserved", "/unserved-test"))
    try:
        before = time.time()
        with pytest.raises(RequestTimeoutError):
            DeploymentHandle("Unserved", "unserved").remote(1).result(timeout_s=60)
        (raw,) = redis_client.lrange(queue("unserved", "Unserved"), 0, -1)
        envelope = parse_message(raw)
        assert envelope.headers["expires"] is not None
        assert envelope.deadline is not None
        assert before + 1.5 <= envelope.deadline <= time.time() + 0.1
    finally:
        delete_app(served.redis_url, "unserved")
        redis_client.delete(queue("unserved", "Unserved"))


def test_a_plain_celery_client_can_call_a_deployment(served: Served) -> None:
    from celery_serve.workers.celery_app import make_celery

    celery = make_celery(served.redis_url)
    try:
        sent = celery.send_task("probe.Calc.add", args=[20, 22], queue=queue("probe", "Calc"), expires=60)
        assert sent.get(timeout=60) == 42
        failing = celery.send_task("probe.Calc.boom", args=["from celery"], queue=queue("probe", "Calc"), expires=60)
        with pytest.raises(ValueError, match="from celery"):
            failing.get(timeout=60)
    finally:
        celery.close()


def test_requests_taken_together_are_skipped_once_their_deadline_passes_while_they_wait(
    served: Served, redis_client: redis.Redis
) -> None:
    """Mixed: request_timeout_s=1, one request at a time. Three 1-second requests wait behind a slow one:
    at most the first of them starts in time; by the time it ends the others' deadlines have passed, so
    they must be skipped, not run."""
    run = uuid.uuid4().hex[:8]
    slow = DeploymentHandle("Mixed", "probe").slow
    holder = slow.remote(f"{run}-holder", 0.5)
    wait_until(lambda: redis_client.get(executions_key(f"{run}-holder")), what="the first request to start")
    tags = [f"{run}-{i}" for i in range(3)]
    waiting = [slow.remote(tag, 1.0) for tag in tags]  # queued while the replica is busy: taken together
    assert holder.result(timeout_s=60) == f"{run}-holder"
    for response in waiting:
        with pytest.raises(RequestTimeoutError):
            response.result(timeout_s=60)

    def all_handled() -> bool:
        held = _inflight_messages(redis_client, "probe", "Mixed")
        return redis_client.llen(queue("probe", "Mixed")) == 0 and not any(run.encode() in m for m in held)

    wait_until(all_handled, timeout_s=60, what="the replica to get through the three requests")
    ran = [tag for tag in tags if redis_client.get(executions_key(tag))]
    assert len(ran) <= 1, f"{ran} ran after their deadline had passed"
