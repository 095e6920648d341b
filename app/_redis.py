"""Redis connections. One place decides how clients are built (hiredis parser, health checks)."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

BLOCK_S = 2.0  # how long a blocking pop waits before it loops (to notice shutdown)


def async_client(url: str, *, single_connection: bool = False) -> aioredis.Redis:
    """An asyncio client; `single_connection` for a listener that blocks on BLPOP/BLMOVE."""
    return aioredis.Redis.from_url(
        url,
        single_connection_client=single_connection,
        # Blocking pops wait up to BLOCK_S; the socket must wait longer than that before it gives up.
        socket_timeout=BLOCK_S + 10 if single_connection else 10,
        health_check_interval=30,  # detect half-open connections on long-idle blocking pops
    )


def sync_client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, health_check_interval=30)


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
