"""A replica process: `python -m celery_serve.workers.replica_main --app A --deployment D --redis-url URL`.

Started by the deployment's worker pool (one process per replica, spawned, never forked, so no CUDA or
Redis state leaks from the parent). Loads the application spec from Redis, imports and constructs the user's
deployment once, then serves until SIGTERM, finishing or handing back what it holds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
import traceback
from typing import Any

import redis

from celery_serve._runtime import context as _context
from celery_serve._runtime import logs
from celery_serve._runtime.spec import AppSpec
from celery_serve._wire import keys as _keys
from celery_serve._wire import lifecycle
from celery_serve._wire.connections import sync_client
from celery_serve.workers.consumer import ReplicaServer
from celery_serve.workers.health import HealthMonitor
from celery_serve.workers.replica import Replica
from celery_serve.workers.updates import UpdateFollower

logger = logging.getLogger("celery_serve.workers.replica")

EXIT_CONFIG = lifecycle.EXIT_CONSTRUCTOR
EXIT_REDIS_AWAY = 1  # Redis did not answer while the replica started: restarted with backoff, no failure recorded
# Redis away (refused, reset, timed out, still loading after a restart), not a command it refused
_REDIS_AWAY = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def _load_spec(url: str, app: str) -> AppSpec:
    raw = sync_client(url).hget(_keys.APPS, app)
    if raw is None:
        raise LookupError(f"application '{app}' is not deployed in this Redis")
    return AppSpec.from_json(raw)


async def _serve(url: str, spec: AppSpec, deployment: str, replica_id: str | None) -> None:
    try:
        replica = Replica(spec, deployment)
    except Exception as exc:
        raise _ConstructorFailed(exc) from exc
    constructed(url, spec.name, deployment)
    if replica.ingress is not None and deployment == spec.ingress:
        _publish_openapi(url, spec.name, replica.ingress)
    server = ReplicaServer(url, replica, replica_id)
    loop = asyncio.get_running_loop()
    health = _health_monitor(url, spec, deployment, server, loop)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stopper(server, health))
    if health is not None:
        health.start()
    follower = asyncio.create_task(UpdateFollower(url, server, _health_options(health)).run(), name="updates")
    try:
        await server.run()
    finally:
        follower.cancel()


def _health_options(health: HealthMonitor | None) -> Any:
    def take(config: dict[str, Any]) -> None:
        if health is not None:
            health.period_s = float(config.get("health_check_period_s") or health.period_s)
            health.timeout_s = float(config.get("health_check_timeout_s") or health.timeout_s)

    return take


class _ConstructorFailed(Exception):
    """The user's constructor raised: counted towards max_constructor_retry_count."""


def _stopper(server: ReplicaServer, health: HealthMonitor | None) -> Any:
    def stop() -> None:
        if health is not None:
            health.stop()  # a replica that is stopping is not replaced for failing a check meanwhile
        server.stop()

    return stop


def _health_monitor(
    url: str, spec: AppSpec, deployment: str, server: ReplicaServer, loop: asyncio.AbstractEventLoop
) -> HealthMonitor | None:
    """A monitor for a class that defines `check_health` (without one, a replica is healthy while it runs)."""
    check = getattr(server.replica.instance, "check_health", None)
    if not callable(check):
        return None
    config = spec.deployments[deployment].config
    return HealthMonitor(
        url,
        spec.name,
        deployment,
        server.replica_id,
        check,
        loop,
        lambda: server.heartbeat.hand_back(server.replica_id, force=True, count=False)[0],
        period_s=float(config.get("health_check_period_s") or 10.0),
        timeout_s=float(config.get("health_check_timeout_s") or 30.0),
    )


def constructed(url: str, app: str, deployment: str) -> None:
    """The constructor succeeded: failures no longer run in a row."""
    try:
        sync_client(url).delete(lifecycle.constructor_failures(app, deployment))
    except Exception as exc:  # noqa: BLE001 - only the count of a later failure streak is affected
        logger.debug("could not reset the constructor failure count: %s", exc)


def record_start_failure(url: str, app: str, deployment: str, message: str, constructor: bool) -> None:
    """Say why this replica could not start (for `run`), and after max_constructor_retry_count constructor
    failures in a row mark the deployment DEPLOY_FAILED (its pool then stops restarting it)."""
    client = sync_client(url)
    client.set(_keys.deployment_error(app, deployment), message, ex=60)
    if not constructor:
        return
    attempts = int(client.incr(lifecycle.constructor_failures(app, deployment)))
    client.expire(lifecycle.constructor_failures(app, deployment), lifecycle.FAILED_TTL_S)
    raw = client.hget(_keys.APPS, app)
    limit = 20
    if raw is not None:
        spec = AppSpec.from_json(raw)
        if deployment in spec.deployments:
            limit = int(spec.deployments[deployment].config.get("max_constructor_retry_count") or 20)
    if attempts >= limit:
        client.set(
            lifecycle.deploy_failed(app, deployment),
            lifecycle.record(
                f"the constructor failed {attempts} times in a row (max_constructor_retry_count={limit}); "
                f"last error: {message}",
                attempts=attempts,
            ),
            ex=lifecycle.FAILED_TTL_S,
        )


def _apply_logging_config(spec: AppSpec, deployment: str) -> None:
    """The deployment's `logging_config` (level, TEXT or JSON) for this replica's log lines."""
    dep = spec.deployments.get(deployment)
    given = (dep.config.get("logging_config") if dep else None) or {}
    level, encoding = given.get("log_level"), given.get("encoding")
    if level or encoding:
        logs.configure(
            level or logging.getLevelName(logging.getLogger().level),
            deployment,
            encoding.lower() if encoding else None,
        )


def _publish_openapi(url: str, app: str, ingress: Any) -> None:
    """Write the FastAPI ingress's OpenAPI schema to Redis, where the gateway's /docs finds it."""
    try:
        sync_client(url).hset(_keys.OPENAPI, app, json.dumps(ingress.openapi()))
    except Exception as exc:  # noqa: BLE001 - /docs is a convenience: serving goes on without it
        logger.warning("could not publish the OpenAPI schema of '%s' for /docs: %s", app, exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celery-serve replica")
    parser.add_argument("--app", required=True)
    parser.add_argument("--deployment", required=True)
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--replica-id", default=None, help="given by the pool, so it can hand back our work")
    parser.add_argument("--log-level", default=os.environ.get("SERVE_LOG_LEVEL", "WARNING"))
    args = parser.parse_args(argv)
    logs.configure(args.log_level, args.deployment)
    os.environ["CELERY_SERVE_REPLICA"] = "1"
    os.environ["REDIS_URL"] = args.redis_url
    os.environ["SERVE_APP"] = args.app
    os.environ["SERVE_DEPLOYMENT"] = args.deployment
    os.environ["SERVE_REPLICA_ID"] = args.replica_id or ""
    _context.set_redis_url(args.redis_url)
    try:
        spec = _load_spec(args.redis_url, args.app)
        _apply_logging_config(spec, args.deployment)
        run = _serve(args.redis_url, spec, args.deployment, args.replica_id)
        try:
            import uvloop

            uvloop.run(run)
        except ImportError:
            asyncio.run(run)
    except _REDIS_AWAY as exc:  # a Redis restart or failover while starting: not the deployment's fault
        logger.warning(
            "replica of %s.%s could not start: Redis did not answer (%s); its pool starts it again",
            args.app,
            args.deployment,
            exc,
        )
        return EXIT_REDIS_AWAY
    except Exception as exc:  # noqa: BLE001 - report why the replica could not start, then exit
        logger.error("replica of %s.%s failed: %s", args.app, args.deployment, traceback.format_exc())
        cause = exc.__cause__ if isinstance(exc, _ConstructorFailed) and exc.__cause__ is not None else exc
        message = f"{type(cause).__name__}: {cause}"
        try:
            record_start_failure(
                args.redis_url, args.app, args.deployment, message, constructor=isinstance(exc, _ConstructorFailed)
            )
        except Exception:  # noqa: BLE001 - Redis itself may be the problem; the log has it
            pass
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
