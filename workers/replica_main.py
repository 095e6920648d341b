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

from celery_serve._runtime import context as _context
from celery_serve._runtime import logs
from celery_serve._runtime.spec import AppSpec
from celery_serve._wire import keys as _keys
from celery_serve._wire.connections import sync_client
from celery_serve.workers.consumer import ReplicaServer
from celery_serve.workers.replica import Replica

logger = logging.getLogger("celery_serve.workers.replica")

EXIT_CONFIG = 3


def _load_spec(url: str, app: str) -> AppSpec:
    raw = sync_client(url).hget(_keys.APPS, app)
    if raw is None:
        raise LookupError(f"application '{app}' is not deployed in this Redis")
    return AppSpec.from_json(raw)


async def _serve(url: str, spec: AppSpec, deployment: str, replica_id: str | None) -> None:
    replica = Replica(spec, deployment)
    if replica.ingress is not None and deployment == spec.ingress:
        _publish_openapi(url, spec.name, replica.ingress)
    server = ReplicaServer(url, replica, replica_id)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.stop)
    await server.run()


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
        run = _serve(args.redis_url, spec, args.deployment, args.replica_id)
        try:
            import uvloop

            uvloop.run(run)
        except ImportError:
            asyncio.run(run)
    except Exception as exc:  # noqa: BLE001 - report why the replica could not start, then exit
        logger.error("replica of %s.%s failed: %s", args.app, args.deployment, traceback.format_exc())
        message = f"{type(exc).__name__}: {exc}"
        try:
            sync_client(args.redis_url).set(_keys.deployment_error(args.app, args.deployment), message, ex=60)
        except Exception:  # noqa: BLE001 - Redis itself may be the problem; the log has it
            pass
        return EXIT_CONFIG
    return 0


if __name__ == "__main__":
    sys.exit(main())
