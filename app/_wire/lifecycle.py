"""Redis keys and records of a deployment's lifecycle: health, start-up failures, deletion.

Kept apart from `keys.py` (the request path) because only replicas, pools and the status reader use them.
`celery_serve.status` turns them into Ray's statuses: a deployment whose replica failed its health checks is
UNHEALTHY until a replica started after that failure passes one; one whose constructor failed
`max_constructor_retry_count` times in a row is DEPLOY_FAILED.
"""

from __future__ import annotations

import json
import time
from typing import Any

EXIT_UNHEALTHY = 4  # a replica's exit code after failing its health checks: the pool replaces it at once
EXIT_CONSTRUCTOR = 3  # the constructor (or loading the application) failed: the pool retries, then gives up
UNHEALTHY_TTL_S = 3600
FAILED_TTL_S = 24 * 3600


def unhealthy(app: str, deployment: str) -> str:
    """JSON {message, at, replica}: the deployment's last failed replica (cleared by a healthy newer one)."""
    return f"serve:unhealthy:{app}:{deployment}"


def deploy_failed(app: str, deployment: str) -> str:
    """JSON {message, at, attempts}: the constructor kept failing; the pool stopped restarting it."""
    return f"serve:deploy-failed:{app}:{deployment}"


def constructor_failures(app: str, deployment: str) -> str:
    """Counter: constructor failures in a row, over every replica of the deployment (reset by a success)."""
    return f"serve:constructor-failures:{app}:{deployment}"


def record(message: str, **extra: Any) -> str:
    return json.dumps({"message": message, "at": time.time(), **extra})


def read(raw: bytes | str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {"message": raw.decode() if isinstance(raw, bytes) else raw, "at": 0.0}
    return value if isinstance(value, dict) else None


def mark_unhealthy(redis: Any, app: str, deployment: str, message: str, replica: str) -> None:
    """Mark the deployment UNHEALTHY because of `replica` (its health checks failed, or its process froze)."""
    redis.set(unhealthy(app, deployment), record(message, replica=replica), ex=UNHEALTHY_TTL_S)
