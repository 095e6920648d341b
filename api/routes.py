"""The gateway's route table: which application's ingress serves a path, read from the specs in Redis.

Refreshed in the background every second, and at once when a path matches nothing (so an application
deployed a moment ago is found on its first request). Longest route prefix wins; `/api` serves `/api` and
`/api/...`, not `/apiary`.

When Redis loses its data (its epoch key changed: see `keys.EPOCH`), the routes known before are kept for
`KEEP_AFTER_DATA_LOSS_S` while the workers re-announce their applications, so the gateway goes on serving
instead of answering 404, and `on_data_loss` tells the transport to fail the requests Redis forgot.
A path that matches no route but an application whose run stopped a moment ago is answered 503, not 404
(`stopped`, see `_wire.stopped_apps`).
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
from celery_serve._wire import stopped_apps as _stopped_apps
from celery_serve._wire.traffic import TRAFFIC_KEY, WeightedChooser, parse_split

logger = logging.getLogger(__name__)

REFRESH_S = 1.0
_MISS_REFRESH_MIN_S = 0.05
KEEP_AFTER_DATA_LOSS_S = 60.0


def effective_weights(split: dict[str, float] | None, specs: list[AppSpec]) -> dict[str, float]:
    """The weights a prefix's requests follow: its split, over the applications deployed there; without a
    split (or when none of its applications is deployed), everything to the incumbent."""
    names = {spec.name for spec in specs}
    if split:
        weights = {name: w for name, w in split.items() if name in names and w > 0}
        if weights:
            return weights
    return {specs[0].name: 1.0}


def _serves(prefix: str, path: str) -> bool:
    """`/api` serves `/api` and `/api/...`, not `/apiary`; `/` serves everything."""
    return prefix == "/" or path == prefix or path.startswith(prefix + "/")


class RouteTable:
    def __init__(
        self, client: aioredis.Redis, on_data_loss: Callable[[], Coroutine[Any, Any, object]] | None = None
    ) -> None:
        self._redis = client
        self._routes: list[tuple[str, AppSpec]] = []
        self._by_prefix: dict[str, list[AppSpec]] = {}  # every application on a prefix, the incumbent first
        self._splits: dict[str, dict[str, float]] = {}
        self._choosers: dict[str, WeightedChooser] = {}
        self._refreshed_at = 0.0
        self._lock = asyncio.Lock()
        self._epoch: bytes | None = None
        self._kept: dict[str, AppSpec] = {}  # applications known before Redis lost its data
        self._keep_until = 0.0
        self._on_data_loss = on_data_loss
        self.stopped: list[_stopped_apps.Stopped] = []  # applications whose run stopped a moment ago

    @property
    def routes(self) -> dict[str, str]:
        """Route prefix -> ingress deployment name (of the incumbent, where several share a prefix)."""
        return {prefix: specs[0].ingress for prefix, specs in self._by_prefix.items()}

    @property
    def traffic(self) -> dict[str, dict[str, float]]:
        """Route prefix -> {application: share of its requests} as routed now (shares sum to 1)."""
        out: dict[str, dict[str, float]] = {}
        for prefix, specs in self._by_prefix.items():
            weights = self._effective(prefix, specs)
            total = sum(weights.values()) or 1.0
            out[prefix] = {spec.name: weights.get(spec.name, 0.0) / total for spec in specs}
        return out

    def _effective(self, prefix: str, specs: list[AppSpec]) -> dict[str, float]:
        return effective_weights(self._splits.get(prefix), specs)

    @property
    def apps(self) -> list[AppSpec]:
        """Every application deployed (several may share a route prefix)."""
        return [spec for specs in self._by_prefix.values() for spec in specs]

    async def refresh(self) -> None:
        async with self._lock:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hgetall(_keys.APPS)
            pipe.set(_keys.EPOCH, uuid.uuid4().hex, nx=True)
            pipe.get(_keys.EPOCH)
            pipe.hgetall(TRAFFIC_KEY)
            pipe.hgetall(_keys.STOPPED)
            raw, _, epoch, splits, stopped = await pipe.execute()
            self.stopped = _stopped_apps.recent(stopped)
            specs = {spec.name: spec for spec in (AppSpec.from_json(v) for v in raw.values())}
            now = time.monotonic()
            if self._epoch is not None and epoch != self._epoch:
                logger.warning(
                    "Redis lost its data; serving the %d known applications while they re-announce", len(self.apps)
                )
                self._kept = {spec.name: spec for specs_ in self._by_prefix.values() for spec in specs_}
                self._keep_until = now + KEEP_AFTER_DATA_LOSS_S
                if self._on_data_loss is not None:
                    asyncio.create_task(self._on_data_loss())
            self._epoch = epoch
            if now < self._keep_until:
                specs = {**self._kept, **specs}
            by_prefix: dict[str, list[AppSpec]] = {}
            for spec in sorted(specs.values(), key=lambda s: (s.deployed_at, s.name)):  # the incumbent first
                by_prefix.setdefault(spec.route_prefix, []).append(spec)
            parsed: dict[str, dict[str, float]] = {}
            for prefix, value in splits.items():
                try:
                    parsed[prefix.decode() if isinstance(prefix, bytes) else prefix] = parse_split(value)
                except (ValueError, TypeError, AttributeError) as exc:
                    logger.warning("ignoring an unreadable traffic split for %r: %s", prefix, exc)
            self._routes = sorted(
                ((p, group[0]) for p, group in by_prefix.items()), key=lambda r: len(r[0]), reverse=True
            )
            choosers = {}
            for prefix, group in by_prefix.items():
                weights = effective_weights(parsed.get(prefix), group)
                old = self._choosers.get(prefix)
                choosers[prefix] = old if old is not None and old.weights == weights else WeightedChooser(weights)
            self._by_prefix, self._splits, self._choosers = by_prefix, parsed, choosers
            self._refreshed_at = now

    async def run(self) -> None:
        """Refresh every REFRESH_S, and at once when an application is deployed or deleted (pub/sub), so a
        deleted application's routes answer 404 as soon as `delete` returns."""
        changed = asyncio.Event()
        listener = asyncio.create_task(self._listen(changed), name="route-changes")
        try:
            while True:
                try:
                    await self.refresh()
                except (redis.exceptions.RedisError, OSError, RuntimeError) as exc:
                    logger.warning("could not refresh routes from Redis: %r", exc)
                changed.clear()
                try:
                    await asyncio.wait_for(changed.wait(), REFRESH_S)
                except TimeoutError:
                    pass
        finally:
            listener.cancel()

    async def _listen(self, changed: asyncio.Event) -> None:
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(_keys.APPS_CHANGED)
                while True:
                    message = await pubsub.get_message(timeout=REFRESH_S)
                    if message is not None:
                        changed.set()
            except (redis.exceptions.RedisError, OSError) as exc:
                logger.debug("route change listener lost Redis (%s); polling meanwhile", exc)
                await asyncio.sleep(REFRESH_S)
            finally:
                await pubsub.aclose()

    def match(self, path: str, *, pick: bool = False) -> tuple[AppSpec, DeploymentSpec | AppSpec] | None:
        """The application serving `path`, and where its requests go: the ingress, or the pipeline.

        With `pick`, a prefix that several applications share is resolved by its traffic split (this
        advances the split's round-robin: once per request routed); without, the incumbent is returned."""
        for prefix, spec in self._routes:
            if _serves(prefix, path):
                if pick:
                    spec = self._pick(prefix, spec)
                return spec, spec if spec.is_pipeline else spec.deployments[spec.ingress]
        return None

    def stopped_for(self, path: str) -> _stopped_apps.Stopped | None:
        """The application whose run stopped a moment ago and whose route prefix serves `path` (the longest
        prefix wins, as in routing); its callers get 503 "stopped", not 404."""
        found = [entry for entry in self.stopped if entry.route_prefix and _serves(entry.route_prefix, path)]
        return max(found, key=lambda entry: len(entry.route_prefix), default=None)

    def _pick(self, prefix: str, incumbent: AppSpec) -> AppSpec:
        """The application this request goes to: the traffic split's pick where several share the prefix."""
        group = self._by_prefix.get(prefix) or [incumbent]
        if len(group) == 1:
            return incumbent
        chooser = self._choosers.get(prefix)
        name = chooser.pick() if chooser is not None else None
        return next((spec for spec in group if spec.name == name), incumbent)

    async def match_fresh(self, path: str, *, pick: bool = False) -> tuple[AppSpec, DeploymentSpec | AppSpec] | None:
        found = self.match(path, pick=pick)
        if found is None and await self.refresh_on_miss():
            found = self.match(path, pick=pick)
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
