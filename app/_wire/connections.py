"""Redis connections. One place decides how clients are built: one Redis, a Sentinel-managed master or a
Redis Cluster (see `celery_serve._wire.urls`), pool sizes (a budget per client), timeouts and health checks.

On a cluster, clients are redis-py's `RedisCluster`: each command goes to the node owning its key's slot
(following MOVED/ASK when slots move), and a pipeline is split per node."""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.cluster as aiocluster
import redis.asyncio.sentinel as aiosentinel
import redis.cluster
import redis.exceptions
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.retry import Retry

from celery_serve._wire.urls import RedisTarget, parse_redis_url, redacted
from celery_serve.exceptions import DeploymentConfigError, ServeError

__all__ = [
    "REDIS_FAULTS",
    "async_client",
    "check_url",
    "command_timeout",
    "interrupt",
    "is_cluster",
    "node_client",
    "redacted",
    "sync_client",
    "wait_for_redis",
]

BLOCK_S = 2.0  # how long a blocking pop waits before it loops (to notice shutdown)
DEFAULT_TIMEOUT_S = 2.0  # how long one command may take before Redis counts as unresponsive
# What a Redis command can raise when the connection, not the command, failed: redis-py's errors, socket errors,
# uvloop's RuntimeError for a write on a transport the peer reset. Callers that must survive any connection
# fault (a replica's loop, the gateway's submit) catch these; a ServeError is not among them.
# KeyError: redis-py's asyncio client on a connection dropped mid-reply.
# RedisClusterException: a cluster client that cannot reach any node (it is not a RedisError).
REDIS_FAULTS: tuple[type[Exception], ...] = (
    redis.exceptions.RedisError,
    redis.exceptions.RedisClusterException,
    OSError,
    RuntimeError,
    KeyError,
)


def breaks_connection(exc: BaseException) -> bool:
    """Whether a Redis fault may have left connections dead or half-read, so that they are worth dropping.

    An error reply (out of memory, a script's error, BUSY) leaves its connection sound: dropping connections then
    would only cut off the commands other tasks have in flight on them, and a command that ran but lost its reply
    is resent (see `_retry`). READONLY is the exception: the connection reaches a demoted primary."""
    return not isinstance(exc, redis.exceptions.ResponseError) or isinstance(exc, redis.exceptions.ReadOnlyError)


REDIS_WAIT_S = 3.0  # how long a command-line tool waits for Redis to answer before it says it cannot
# Connections one pooled client may open (`SERVE_REDIS_MAX_CONNECTIONS`). A command holds one only for its
# round trip (~0.2 ms), so 32 carry well over 50,000 commands/s; more wait for a free one instead of failing.
DEFAULT_MAX_CONNECTIONS = 32


def command_timeout() -> float:
    """Seconds a Redis command may take (`SERVE_REDIS_TIMEOUT_S`, default 2): past it, Redis counts as
    unresponsive and the caller answers 503 instead of hanging (a paused or overloaded Redis)."""
    raw = os.environ.get("SERVE_REDIS_TIMEOUT_S")
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0.05 <= value <= 300:
        raise DeploymentConfigError(f"SERVE_REDIS_TIMEOUT_S must be a number of seconds from 0.05 to 300, got {raw!r}")
    return value


def _retry() -> Retry:
    """Retry once, at once, when the server closed the connection before answering (a restart, a proxy or load
    balancer reset, an idle connection reaped); never on a timeout (Redis is slow: retrying only doubles the wait)."""
    return Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))


def _async_retry() -> AsyncRetry:
    """`_retry` for asyncio clients (redis-py >= 8.2 converts a synchronous one, with a warning)."""
    return AsyncRetry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,))


def max_connections() -> int:
    """The pooled-client connection budget, from the environment (validated at the door)."""
    raw = os.environ.get("SERVE_REDIS_MAX_CONNECTIONS")
    if not raw:
        return DEFAULT_MAX_CONNECTIONS
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= 10_000:
        raise DeploymentConfigError(f"SERVE_REDIS_MAX_CONNECTIONS must be an integer from 1 to 10000, got {raw!r}")
    return value


class _BlockingSentinelPool(aiosentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A Sentinel-managed pool that waits for a free connection at its limit (like BlockingConnectionPool)
    instead of raising "Too many connections"."""


def _target(url: str) -> RedisTarget:
    return parse_redis_url(url)


def is_cluster(url: str) -> bool:
    """Whether the URL names a Redis Cluster (redis+cluster://)."""
    return parse_redis_url(url).kind == "cluster"


def _cluster_kwargs(target: RedisTarget, socket_timeout: float, connect_timeout: float) -> dict[str, Any]:
    return {
        "username": target.username,
        "password": target.password,
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "health_check_interval": 30,
    }


def _sentinel_kwargs(target: RedisTarget, socket_timeout: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"socket_timeout": socket_timeout, "socket_connect_timeout": min(socket_timeout, 2.0)}
    if target.sentinel_password:
        kwargs["password"] = target.sentinel_password
    return kwargs


def _node_kwargs(target: RedisTarget) -> dict[str, Any]:
    return {"db": target.db, "username": target.username, "password": target.password}


def _blocking_pool(timeout: float) -> dict[str, Any]:
    """A blocking pool's options: with thousands of requests in flight, a command waits for a free connection
    instead of failing with "Too many connections" (redis-py's plain pool raises at its limit); it waits no
    longer than a command may take, so a hung Redis is reported within that time."""
    return {
        "max_connections": max_connections(),
        "timeout": timeout,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _async_retry(),
        "health_check_interval": 30,
    }


def async_client(url: str, *, single_connection: bool = False) -> aioredis.Redis:
    """An asyncio client; `single_connection` for a listener that blocks on BLPOP/BLMOVE/XREAD."""
    target = _target(url)
    timeout = command_timeout()
    # Blocking pops wait up to BLOCK_S; a listener's socket must wait longer than that before it gives up.
    socket_timeout = BLOCK_S + timeout if single_connection else timeout
    if target.kind == "cluster":
        # A connection pool per node (the budget applies per node); a blocking pop holds one of its node's.
        # The same commands as a client of one Redis; callers type it as one (see `is_cluster` for the rest).
        return aiocluster.RedisCluster(  # type: ignore[return-value]
            startup_nodes=[aiocluster.ClusterNode(host, port) for host, port in target.hosts],
            max_connections=max_connections(),
            **_cluster_kwargs(target, socket_timeout, timeout),
        )
    if target.kind == "single":
        if single_connection:
            return aioredis.Redis.from_url(
                url,
                single_connection_client=True,
                socket_timeout=socket_timeout,
                socket_connect_timeout=timeout,
                retry=_async_retry(),
                health_check_interval=30,  # detect half-open connections on long-idle blocking pops
            )
        return aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(url, **_blocking_pool(timeout)))
    # Sentinel: each new connection asks a Sentinel where the master is; after a failover, connections to
    # the old master fail (or read READONLY) and reconnect to the promoted replica.
    sentinel = aiosentinel.Sentinel(target.hosts, sentinel_kwargs=_sentinel_kwargs(target, socket_timeout))
    common = {
        **_node_kwargs(target),
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": timeout,
        "retry": _async_retry(),
        "health_check_interval": 30,
    }
    if single_connection:
        client = aioredis.Redis(
            connection_pool=aiosentinel.SentinelConnectionPool(target.master, sentinel, **common),
            single_connection_client=True,
        )
        client.auto_close_connection_pool = True
        return client
    pool = _BlockingSentinelPool(target.master, sentinel, max_connections=max_connections(), timeout=timeout, **common)
    return aioredis.Redis.from_pool(pool)


def node_client(url: str, host: str, port: int) -> aioredis.Redis:
    """A plain asyncio client of one node of the cluster `url` names (its credentials and timeouts), for
    commands that must share one connection with a keyed command, which redis-py's cluster client does not
    promise (`WAIT` after a request's enqueue). A pipeline on it runs on one connection."""
    pool = aioredis.BlockingConnectionPool(
        host=host, port=port, **_blocking_pool(command_timeout()), **_node_kwargs(_target(url))
    )
    return aioredis.Redis.from_pool(pool)


async def interrupt(client: Any) -> None:
    """End a listener's blocked read at once (cancelling a blocked read in redis-py can hang): disconnect a
    single-connection client; close a cluster client (its connections are per node)."""
    if client is None:
        return
    if isinstance(client, aiocluster.RedisCluster):
        with contextlib.suppress(Exception):
            await client.aclose()
        return
    connection = client.connection
    if connection is not None:
        await connection.disconnect(nowait=True)


def sync_client(url: str, *, socket_timeout: float | None = None) -> redis.Redis:
    """A synchronous client (its pool grows with the threads that use it at once); commands time out after
    `socket_timeout` (default: `command_timeout()`), so a hung Redis is an error, not a hang."""
    target = _target(url)
    socket_timeout = command_timeout() if socket_timeout is None else socket_timeout
    if target.kind == "cluster":
        return redis.cluster.RedisCluster(  # type: ignore[return-value]
            startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in target.hosts],
            **_cluster_kwargs(target, socket_timeout, socket_timeout),
        )
    if target.kind == "single":
        return redis.Redis.from_url(
            url,
            health_check_interval=30,
            socket_timeout=socket_timeout,
            socket_connect_timeout=socket_timeout,
            retry=_retry(),
        )
    sentinel = redis.sentinel.Sentinel(target.hosts, sentinel_kwargs=_sentinel_kwargs(target, socket_timeout))
    return sentinel.master_for(
        target.master,
        socket_timeout=socket_timeout,
        socket_connect_timeout=socket_timeout,
        retry=_retry(),
        health_check_interval=30,
        **_node_kwargs(target),
    )


def check_url(url: str) -> str:
    """Refuse a Redis URL that redis-py would misread, with the forms it may take."""
    _target(url)
    return url


def wait_for_redis(url: str, timeout_s: float = REDIS_WAIT_S) -> None:
    """Return once Redis answers PING; `ServeError` with one clear line if it does not within `timeout_s`
    (connection refused or timing out) or refuses us (wrong password, no permission)."""
    check_url(url)
    deadline = time.monotonic() + timeout_s
    client: redis.Redis | None = None
    try:
        while True:
            try:
                if client is None:  # a cluster client connects as it is made
                    client = sync_client(url, socket_timeout=min(timeout_s, 2.0))
                client.ping()
                return
            except (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
                raise ServeError(f"Redis at {redacted(url)} refused the credentials: {exc}") from None
            except redis.exceptions.ResponseError as exc:
                if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                    raise ServeError(f"Redis at {redacted(url)} refused the credentials: {exc}") from None
                raise ServeError(f"Redis at {redacted(url)} answered PING with an error: {exc}") from None
            except (
                redis.exceptions.ConnectionError,
                redis.exceptions.TimeoutError,
                redis.exceptions.RedisClusterException,
                redis.exceptions.ClusterDownError,
                OSError,
            ) as exc:
                if time.monotonic() >= deadline:
                    raise ServeError(
                        f"cannot reach Redis at {redacted(url)} ({_reason(exc)}); is it running? "
                        "(--redis-url / REDIS_URL)"
                    ) from None
                time.sleep(0.05)
    finally:
        if client is not None:
            client.close()


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    if isinstance(exc, redis.exceptions.TimeoutError) or "timed out" in text.lower():
        return "timed out"
    return text.split(". ", 1)[0] or type(exc).__name__
