"""Redis URLs: one Redis, a Sentinel-managed master, or a Redis Cluster, read once into a `RedisTarget`.

    redis://[[user]:password@]host:port[/db]              one Redis (rediss:// for TLS, unix:///path.sock)
    redis+sentinel://[[user]:password@]host:port[,host:port...]/<master name>[/<db>][?sentinel_password=...]
    redis+cluster://[[user]:password@]host:port[,host:port...]

Every component takes the same URL (`--redis-url`, `REDIS_URL`); `celery_serve._wire.connections` builds
clients from the target and `celery_serve.workers.celery_app` gives Celery the equivalent kombu URL. The
password in the URL is the data nodes'; Sentinels that require one of their own take `sentinel_password`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import parse_qs, quote, unquote

from celery_serve.exceptions import DeploymentConfigError

SINGLE_SCHEMES = ("redis://", "rediss://", "unix://")
SENTINEL_SCHEME = "redis+sentinel://"
CLUSTER_SCHEME = "redis+cluster://"
SCHEMES = (*SINGLE_SCHEMES, SENTINEL_SCHEME, CLUSTER_SCHEME)
SENTINEL_PORT = 26379
_EXAMPLES = "redis://localhost:6379/0, redis+sentinel://host1:26379,host2:26379/mymaster/0"


@dataclass(frozen=True)
class RedisTarget:
    """What a Redis URL names."""

    kind: Literal["single", "sentinel", "cluster"]
    url: str
    hosts: tuple[tuple[str, int], ...] = ()  # sentinels, or cluster seed nodes
    master: str = ""  # the Sentinel service name
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_password: str | None = field(default=None, repr=False)


def redacted(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def _bad(url: str, why: str) -> DeploymentConfigError:
    return DeploymentConfigError(f"invalid Redis URL {redacted(url)!r}: {why} (for example {_EXAMPLES})")


def parse_redis_url(url: str) -> RedisTarget:
    """Read a Redis URL; `DeploymentConfigError` naming what is wrong and the forms that work."""
    if url.startswith(SINGLE_SCHEMES):
        return RedisTarget("single", url)
    for scheme, kind in ((SENTINEL_SCHEME, "sentinel"), (CLUSTER_SCHEME, "cluster")):
        if url.startswith(scheme):
            return _parse_multi(url, scheme, kind)  # type: ignore[arg-type]
    raise _bad(url, f"it must start with {', '.join(SCHEMES)}")


def _parse_multi(url: str, scheme: str, kind: Literal["sentinel", "cluster"]) -> RedisTarget:
    rest = url[len(scheme) :]
    rest, _, query = rest.partition("?")
    username = password = None
    if "@" in rest:
        credentials, rest = rest.rsplit("@", 1)
        user, has_password, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    netloc, _, path = rest.partition("/")
    hosts = []
    for part in netloc.split(","):
        host, _, port = part.strip().rpartition(":") if ":" in part else (part.strip(), "", "")
        if not host:
            raise _bad(url, f"{part!r} is not host:port")
        try:
            hosts.append((host.strip("[]"), int(port) if port else (SENTINEL_PORT if kind == "sentinel" else 6379)))
        except ValueError:
            raise _bad(url, f"the port in {part!r} is not a number") from None
    segments = [s for s in path.split("/") if s]
    options = parse_qs(query)
    master, db = "", 0
    if kind == "sentinel":
        if not segments:
            raise _bad(url, "a Sentinel URL names the master after the hosts: .../<master name>[/<db>]")
        master = unquote(segments[0])
        db_part = segments[1:]
    else:
        db_part = segments
    if db_part:
        if len(db_part) > 1 or not db_part[0].isdigit():
            raise _bad(url, f"the database must be a number, got {'/'.join(db_part)!r}")
        db = int(db_part[0])
    if kind == "cluster" and db:
        raise _bad(url, "Redis Cluster has only database 0")
    sentinel_password = options.get("sentinel_password", [None])[0]
    return RedisTarget(kind, url, tuple(hosts), master, db, username, password, sentinel_password)


def userinfo(username: str | None, password: str | None) -> str:
    """`user:password@` for a URL, percent-encoded; '' when there is no password."""
    if password is None:
        return ""
    return f"{quote(username or '', safe='')}:{quote(password, safe='')}@"


def single_node_url(host: str, port: int, target: RedisTarget) -> str:
    """A plain redis:// URL for one node of a Sentinel or Cluster target (same credentials and db)."""
    return f"redis://{userinfo(target.username, target.password)}{host}:{port}/{target.db}"
