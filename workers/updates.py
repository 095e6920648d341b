"""In-place updates of a running replica (Ray Serve's "lightweight" updates).

When its application is deployed again, a replica reads the new spec. If its deployment's identity (code
version plus every option that needs a restart, see `DeploymentSpec.identity`) is unchanged, it takes the
new options where it stands: a changed `user_config` is passed to `reconfigure()`, and the replica then
reports the new spec's version, which is what `run` waits for. Otherwise it does nothing: its pool replaces
it, replica by replica (see `celery_serve.workers.rollout`).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

import redis.exceptions

from celery_serve._runtime.spec import AppSpec
from celery_serve._wire import keys as _keys
from celery_serve._wire.connections import async_client

logger = logging.getLogger(__name__)

_RETRY_S = 1.0


class UpdateFollower:
    """Listens for new deployments of the replica's application and applies lightweight ones in place."""

    def __init__(self, url: str, server: Any, on_health_options: Callable[[dict[str, Any]], None]) -> None:
        self.url = url
        self.server = server
        self.replica = server.replica
        self.on_health_options = on_health_options
        self.identity = self.replica.spec.identity

    async def run(self) -> None:
        client = async_client(self.url)
        app = self.replica.app.name
        try:
            while True:
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                try:
                    await pubsub.subscribe(_keys.APPS_CHANGED)
                    await self.check(client)  # a deploy between our start and the subscription
                    while True:
                        message = await pubsub.get_message(timeout=5.0)
                        if message is not None and _text(message["data"]) == app:
                            await self.check(client)
                except (redis.exceptions.RedisError, OSError) as exc:
                    logger.debug("update follower lost Redis (%s); retrying", exc)
                    await asyncio.sleep(_RETRY_S)
                finally:
                    await pubsub.aclose()
        finally:
            await client.aclose()

    async def check(self, client: Any) -> None:
        raw = await client.hget(_keys.APPS, self.replica.app.name)
        if raw is None:
            return  # deleted: the pool stops this replica
        await self.apply(AppSpec.from_json(raw), client)

    async def apply(self, spec: AppSpec, client: Any) -> bool:
        """Take `spec` in place if this replica's identity is unchanged; True if it did."""
        current = self.replica.app
        dep = spec.deployments.get(self.replica.name)
        if dep is None or spec.deployed_at == current.deployed_at:
            return False
        if dep.identity != self.identity:
            return False  # new code or a restart-only option: the pool rolls this replica over
        old_user_config = self.replica.spec.config.get("user_config")
        new_user_config = dep.config.get("user_config")
        if new_user_config != old_user_config:
            reconfigure = getattr(self.replica.instance, "reconfigure", None)
            if callable(reconfigure) and new_user_config is not None:
                try:
                    result = reconfigure(new_user_config)
                    if inspect.isawaitable(result):
                        await result
                except Exception as exc:  # noqa: BLE001 - the update fails, visibly; the replica keeps serving
                    message = f"reconfigure() raised {type(exc).__name__}: {exc}"
                    logger.error("replica %s: %s", self.server.replica_id, message)
                    await client.set(_keys.deployment_error(spec.name, self.replica.name), message, ex=60)
                    return False
        self.replica.spec.config.clear()
        self.replica.spec.config.update(dep.config)  # the consumer reads the same dict
        self.replica.app = spec
        self.replica.root_path = "" if spec.route_prefix == "/" else spec.route_prefix
        self.on_health_options(dep.config)
        liveness = self.server.heartbeat
        liveness.info = json.dumps({**json.loads(liveness.info), "deployed_at": spec.deployed_at})
        await asyncio.to_thread(liveness.register)
        logger.info("replica %s took the new version of '%s' in place", self.server.replica_id, spec.name)
        return True


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
