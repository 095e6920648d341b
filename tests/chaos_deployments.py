"""Deployments for the fault-injection suite. Each execution is recorded (the replica's pid, pushed to
`chaos:runs:<value>` on the test's Redis, straight, not through the proxy), so the ledger can count how many
times every request ran. A value that starts with "poison" kills its replica (SIGKILL, like a segfault in a
native library or the OOM killer), until the test sets `chaos:cured`."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import redis

import celery_serve as serve

_client: redis.Redis | None = None


def _record(value: Any) -> None:
    global _client
    url = os.environ.get("CHAOS_REDIS_URL")
    if not url:
        return
    if _client is None:
        _client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
    try:
        pipe = _client.pipeline(transaction=False)
        pipe.rpush(f"chaos:runs:{value}", os.getpid())
        pipe.rpush("chaos:starts", f"{os.getpid()} {time.time()} {value}")
        pipe.execute()
    except redis.RedisError:
        pass  # Redis itself is the fault under test; the count is then a lower bound


def _maybe_die(value: Any) -> None:
    """Poison kills its replica, unless the test has cured it (the `chaos:cured` key: a fixed bug)."""
    if isinstance(value, str) and value.startswith("poison"):
        try:
            cured = _client is not None and _client.exists("chaos:cured")
        except redis.RedisError:
            cured = False
        if not cured:
            os.kill(os.getpid(), signal.SIGKILL)


@serve.deployment(num_replicas=2, max_ongoing_requests=8, request_timeout_s=60, job_retention_s=300)
class Echo:
    def __call__(self, value: Any, sleep_s: float = 0.0) -> dict[str, Any]:
        _record(value)
        _maybe_die(value)
        if sleep_s:
            time.sleep(sleep_s)
        return {"echo": value}


@serve.deployment(num_replicas=1, request_timeout_s=60)
class Batched:
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.3)
    def __call__(self, values: list[Any]) -> list[dict[str, Any]]:
        for value in values:
            _record(value)
        for value in values:
            _maybe_die(value)
        return [{"echo": value} for value in values]


echo_app = Echo.bind()
batched_app = Batched.bind()
