"""Deployments the autoscaling and observability tests serve (module level, so workers import them).

Each request records its execution in Redis under `serve-test:scaling:<tag>` (a hash: request key ->
times it ran), so a test can prove that every request ran exactly once while replicas came and went.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis
from starlette.requests import Request

from celery_serve import batch, deployment

_client: redis.Redis | None = None


def runs_key(tag: str) -> str:
    return f"serve-test:scaling:{tag}"


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["REDIS_URL"])
    return _client


def _work(tag: str, key: str, seconds: float) -> dict[str, Any]:
    time.sleep(seconds)
    _redis().hincrby(runs_key(tag), key, 1)
    return {"key": key, "pid": os.getpid()}


# Fast delays so a test sees a whole cycle in seconds; num_cpus small so four fit on a 2-core machine.
STEP_SCALING = {
    "min_replicas": 1,
    "max_replicas": 4,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 3.0,
    "metrics_interval_s": 0.25,
}


# max_ongoing_requests as the targets: sync methods run side by side in threads up to it (as in Ray), and
# sleeping "work" would otherwise let one replica absorb any load without ever needing another.
@deployment(autoscaling_config=STEP_SCALING, num_cpus=0.25, request_timeout_s=120, max_ongoing_requests=2)
class Step:
    """50 ms of work per request, two at a time per replica."""

    def __call__(self, tag: str, key: str) -> dict[str, Any]:
        return _work(tag, key, 0.05)


@deployment(
    autoscaling_config={
        "min_replicas": 0,
        "max_replicas": 2,
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 1.0,
        "metrics_interval_s": 0.25,
    },
    num_cpus=0.25,
    request_timeout_s=90,
)
class FromZero:
    def __call__(self, tag: str, key: str) -> dict[str, Any]:
        return _work(tag, key, 0.01)


@deployment(
    autoscaling_config={
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 1,
        "upscale_delay_s": 0.5,
        "downscale_delay_s": 2.0,
        "metrics_interval_s": 0.25,
    },
    num_cpus=0.25,
    request_timeout_s=120,
    max_ongoing_requests=1,
)
class Restartable:
    def __call__(self, tag: str, key: str) -> dict[str, Any]:
        return _work(tag, key, 0.05)


@deployment(num_cpus=0.25)
class Watched:
    """A fixed deployment served over HTTP, with a batched method and one that fails, for Flower,
    /metrics and status."""

    async def __call__(self, request: Request) -> dict[str, Any]:
        if request.query_params.get("fail"):
            raise ValueError("asked to fail")
        return {"ok": True}

    def record(self, tag: str, key: str) -> dict[str, Any]:
        return _work(tag, key, 0.0)

    @batch(max_batch_size=8, batch_wait_timeout_s=0.05)
    def double(self, xs: list[int]) -> list[int]:
        return [2 * x for x in xs]

    def fail(self, message: str) -> None:
        raise ValueError(message)


@deployment(num_replicas=3, num_cpus=0.25, max_ongoing_requests=4, request_timeout_s=120)
class Held:
    """Async work: each replica holds up to four requests at once (what a retired replica must finish)."""

    async def __call__(self, tag: str, key: str) -> dict[str, Any]:
        await asyncio.sleep(0.2)
        _redis().hincrby(runs_key(tag), key, 1)
        return {"key": key, "pid": os.getpid()}


step_app = Step.bind()
held_app = Held.bind()
from_zero_app = FromZero.bind()
restartable_app = Restartable.bind()
watched_app = Watched.bind()
