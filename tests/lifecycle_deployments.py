"""Deployments for the lifecycle tests (health checks, start-up failures, updates, delete, config files).

At module level so worker processes import them by module path. What a test must see from outside is
recorded in the Redis the replica serves from (`REDIS_URL`), under keys starting with `serve-test:`.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis
from starlette.requests import Request

from celery_serve import deployment

_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["REDIS_URL"])
    return _client


def broken_key(tag: str) -> str:
    """Holds the pid of the replica whose "database connection" is broken (its health check fails)."""
    return f"serve-test:broken:{tag}"


# --- Ray's health-check example: a replica whose database connection broke is replaced -------------------


class _Connection:
    def __init__(self, tag: str) -> None:
        self.tag = tag

    def is_connected(self) -> bool:
        broken = _redis().get(broken_key(self.tag))
        return broken is None or int(broken) != os.getpid()


def connect_to_db(db_addr: str) -> _Connection:
    return _Connection(db_addr)


@deployment(health_check_period_s=0.2, health_check_timeout_s=1.0)
class MyDeployment:
    def __init__(self, db_addr: str) -> None:
        self._my_db_connection = connect_to_db(db_addr)

    async def __call__(self, request: Request) -> dict[str, Any]:
        delay = float(request.query_params.get("sleep", "0"))
        await asyncio.sleep(delay)
        return {"pid": os.getpid()}

    def check_health(self) -> None:
        if not self._my_db_connection.is_connected():
            raise RuntimeError("uh-oh, DB connection is broken.")


health_app = MyDeployment.bind("health")


@deployment(health_check_period_s=0.2, health_check_timeout_s=0.3)
class Hangs:
    """Its async health check never returns once the replica is marked broken (a hang, not an error)."""

    def __init__(self, tag: str) -> None:
        self.tag = tag

    def __call__(self) -> int:
        return os.getpid()

    async def check_health(self) -> None:
        if not _Connection(self.tag).is_connected():
            await asyncio.sleep(3600)


hang_app = Hangs.bind("hang")


@deployment(health_check_period_s=1, health_check_timeout_s=2)
class Freezes:
    """A replica whose whole process a test freezes (SIGSTOP): its own health checks freeze with it."""

    def __call__(self, sleep: float = 0.0) -> int:
        time.sleep(sleep)
        return os.getpid()


freeze_app = Freezes.bind()


@deployment
class Updatable:
    """Deployed good, then updated to a version whose constructor raises: the update must roll back."""

    def __init__(self, broken: bool) -> None:
        if broken:
            raise RuntimeError("the new model does not load")

    def __call__(self) -> dict[str, Any]:
        return {"version": "good", "pid": os.getpid()}


good_app = Updatable.bind(False)
broken_update_app = Updatable.bind(True)


# --- a constructor that keeps failing ----------------------------------------------------------------


@deployment(max_constructor_retry_count=2)
class FailingConstructor:
    def __init__(self) -> None:
        raise FileNotFoundError("model weights not found at /models/missing.bin")

    def __call__(self) -> str:
        return "never"


failing_app = FailingConstructor.bind()


# --- in-place reconfigure and rolling updates -----------------------------------------------------------


@deployment(num_replicas=2, user_config={"greeting": "hello"})
class Greeter:
    def __init__(self) -> None:
        self.greeting = "unset"
        self.reconfigured = 0

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.greeting = config["greeting"]
        self.reconfigured += 1

    def __call__(self, request: Request | None = None) -> dict[str, Any]:
        return {"greeting": self.greeting, "pid": os.getpid(), "reconfigured": self.reconfigured}


@deployment(num_replicas=2, graceful_shutdown_wait_loop_s=0.1, graceful_shutdown_timeout_s=10)
class Versioned:
    def __init__(self, version: str) -> None:
        self.version = version

    async def __call__(self, request: Request) -> dict[str, Any]:
        await asyncio.sleep(0.02)
        return {"version": self.version, "pid": os.getpid()}


# --- graceful shutdown ------------------------------------------------------------------------------------


@deployment(graceful_shutdown_wait_loop_s=0.1, graceful_shutdown_timeout_s=0.5)
class Slow:
    def __init__(self, fast: bool = False) -> None:
        self.fast = fast  # a new version that answers at once (so a handed-back request ends quickly)

    async def __call__(self, request: Request) -> dict[str, Any]:
        if not self.fast:
            await asyncio.sleep(float(request.query_params.get("sleep", "0")))
        return {"pid": os.getpid(), "fast": self.fast}


slow_app = Slow.bind()


# --- delete ----------------------------------------------------------------------------------------------


@deployment(max_ongoing_requests=1)
def one_at_a_time(request: Request) -> str:
    time.sleep(float(request.query_params.get("sleep", "0")))
    return "done"


doomed_app = one_at_a_time.bind()


# --- config files ----------------------------------------------------------------------------------------


@deployment
class Echo:
    def __init__(self, prefix: str = "echo") -> None:
        self.prefix = prefix
        self.config: dict[str, Any] = {}

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.config = config

    def __call__(self, request: Request) -> dict[str, Any]:
        return {"prefix": self.prefix, "config": self.config, "pid": os.getpid()}


@deployment
class Front:
    def __init__(self, echo: Any) -> None:
        self.echo = echo

    async def __call__(self, request: Request) -> dict[str, Any]:
        return {"front": True, "echo": await self.echo.remote(None)}


echo_app = Echo.bind()
front_app = Front.bind(Echo.bind("inner"))
