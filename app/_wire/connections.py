"""Redis connections. One place decides how clients are built (hiredis parser, health checks)."""

from __future__ import annotations

import time

import redis
import redis.asyncio as aioredis
import redis.exceptions

from celery_serve.exceptions import DeploymentConfigError, ServeError

BLOCK_S = 2.0  # how long a blocking pop waits before it loops (to notice shutdown)
MAX_CONNECTIONS = 100  # per pooled client; a command holds one only for its round trip
POOL_WAIT_S = 20.0  # how long a command waits for a free pooled connection before it fails
REDIS_WAIT_S = 3.0  # how long a command-line tool waits for Redis to answer before it says it cannot
_SCHEMES = ("redis://", "rediss://", "unix://")


def async_client(url: str, *, single_connection: bool = False) -> aioredis.Redis:
    """An asyncio client; `single_connection` for a listener that blocks on BLPOP/BLMOVE."""
    if single_connection:
        return aioredis.Redis.from_url(
            url,
            single_connection_client=True,
            # Blocking pops wait up to BLOCK_S; the socket must wait longer than that before it gives up.
            socket_timeout=BLOCK_S + 10,
            health_check_interval=30,  # detect half-open connections on long-idle blocking pops
        )
    # A blocking pool: with thousands of requests in flight, a command waits for a free connection
    # instead of failing with "Too many connections" (redis-py's plain pool raises at its limit).
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT_S, socket_timeout=10, health_check_interval=30
    )
    return aioredis.Redis.from_pool(pool)


def sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, health_check_interval=30)


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def check_url(url: str) -> str:
    """Refuse a Redis URL that redis-py would misread, with the form it should take."""
    if not url.startswith(_SCHEMES):
        raise DeploymentConfigError(
            f"Redis URL must start with {', '.join(_SCHEMES)} (got {redacted(url)!r}); for example "
            "redis://localhost:6379/0"
        )
    return url


def wait_for_redis(url: str, timeout_s: float = REDIS_WAIT_S) -> None:
    """Return once Redis answers PING; `ServeError` with one clear line if it does not within `timeout_s`
    (connection refused or timing out) or refuses us (wrong password, no permission)."""
    check_url(url)
    client = redis.Redis.from_url(url, socket_connect_timeout=min(timeout_s, 2.0), socket_timeout=min(timeout_s, 2.0))
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                client.ping()
                return
            except (redis.exceptions.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
                raise ServeError(f"Redis at {redacted(url)} refused the credentials: {exc}") from None
            except redis.exceptions.ResponseError as exc:
                if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
                    raise ServeError(f"Redis at {redacted(url)} refused the credentials: {exc}") from None
                raise ServeError(f"Redis at {redacted(url)} answered PING with an error: {exc}") from None
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                if time.monotonic() >= deadline:
                    raise ServeError(
                        f"cannot reach Redis at {redacted(url)} ({_reason(exc)}); is it running? "
                        "(--redis-url / REDIS_URL)"
                    ) from None
                time.sleep(0.05)
    finally:
        client.close()


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if "refused" in text.lower():
        return "connection refused"
    if isinstance(exc, redis.exceptions.TimeoutError) or "timed out" in text.lower():
        return "timed out"
    return text.split(". ", 1)[0] or type(exc).__name__
