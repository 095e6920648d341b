"""Redis connections. One place decides how clients are built (hiredis parser, health checks)."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

BLOCK_S = 2.0  # how long a blocking pop waits before it loops (to notice shutdown)
MAX_CONNECTIONS = 100  # per pooled client; a command holds one only for its round trip
POOL_WAIT_S = 20.0  # how long a command waits for a free pooled connection before it fails


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
