"""The gateway's route table: which application's ingress serves a path, read from the specs in Redis.

Refreshed in the background every second, and at once when a path matches nothing (so an application
deployed a moment ago is found on its first request). Longest route prefix wins; `/api` serves `/api` and
`/api/...`, not `/apiary`.

When Redis loses its data (its epoch key changed: see `keys.EPOCH`), the routes known before are kept for
`KEEP_AFTER_DATA_LOSS_S` while the workers re-announce their applications, so the gateway goes on serving
instead of answering 404, and `on_data_loss` tells the transport to fail the requests Redis forgot.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from celery_serve._runtime.spec import AppSpec, DeploymentSpec
from celery_serve._wire import keys as _keys

logger = logging.getLogger(__name__)

REFRESH_S = 1.0
_MISS_REFRESH_MIN_S = 0.05
KEEP_AFTER_DATA_LOSS_S = 60.0


class RouteTable:
    def __init__(
        self, client: aioredis.Redis, on_data_loss: Callable[[], Coroutine[Any, Any, object]] | None = None
    ) -> None:
        self._redis = client
        self._routes: list[tuple[str, AppSpec]] = []
        self._refreshed_at = 0.0
        self._lock = asyncio.Lock()
        self._epoch: bytes | None = None
        self._kept: dict[str, AppSpec] = {}  # applications known before Redis lost its data
        self._keep_until = 0.0
        self._on_data_loss = on_data_loss

    @property
    def routes(self) -> dict[str, str]:
        """Route prefix -> ingress deployment name."""
        return {prefix: spec.ingress for prefix, spec in self._routes}

    @property
    def apps(self) -> list[AppSpec]:
        return [spec for _, spec in self._routes]

    async def refresh(self) -> None:
        async with self._lock:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(_keys.APPS)
            pipe.set(_keys.EPOCH, uuid.uuid4().hex, nx=True)
            pipe.get(_keys.EPOCH)
            raw, _, epoch = await pipe.execute()
            specs = {spec.name: spec for spec in (AppSpec.from_json(v) for v in raw.values())}
            now = time.monotonic()
            if self._epoch is not None and epoch != self._epoch:
                logger.warning(
                    "Redis lost its data; serving the %d known applications while they re-announce", len(self._routes)
                )
                self._kept = {spec.name: spec for _, spec in self._routes}
                self._keep_until = now + KEEP_AFTER_DATA_LOSS_S
                if self._on_data_loss is not None:
                    asyncio.create_task(self._on_data_loss())
            self._epoch = epoch
            if now < self._keep_until:
                specs = {**self._kept, **specs}
            self._routes = sorted(((s.route_prefix, s) for s in specs.values()), key=lambda r: len(r[0]), reverse=True)
            self._refreshed_at = now

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except (redis.exceptions.RedisError, OSError, RuntimeError) as exc:
                logger.warning("could not refresh routes from Redis: %r", exc)
            await asyncio.sleep(REFRESH_S)

    def match(self, path: str) -> tuple[AppSpec, DeploymentSpec | AppSpec] | None:
        """The application serving `path`, and where its requests go: the ingress, or the pipeline."""
        for prefix, spec in self._routes:
            if prefix == "/" or path == prefix or path.startswith(prefix + "/"):
                return spec, spec if spec.is_pipeline else spec.deployments[spec.ingress]
        return None

    async def match_fresh(self, path: str) -> tuple[AppSpec, DeploymentSpec | AppSpec] | None:
        found = self.match(path)
        if found is None and await self.refresh_on_miss():
            found = self.match(path)
        return found

    def mark_stale(self) -> None:
        """Redis just failed a command: the next miss must ask Redis (and fail), not trust the cache."""
        self._refreshed_at = 0.0

    async def refresh_on_miss(self) -> bool:
        """Read the specs again after a lookup found nothing, unless that was just done; True if it was."""
        if time.monotonic() - self._refreshed_at <= _MISS_REFRESH_MIN_S:
            return False
        await self.refresh()
        return True
