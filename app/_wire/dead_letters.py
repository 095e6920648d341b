"""Reading and acting on deployments' dead-letter lists (the `celery-serve dlq` commands).

An entry is what a replica or the reaper gave up on: a request that killed its replica `max_deliveries` times,
or a message no replica can read. Each keeps the whole message, so it can be inspected and replayed once the
cause is fixed (a replay runs it again under the same job id, with its delivery count reset).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import redis

from celery_serve._runtime.spec import AppSpec
from celery_serve._wire import keys as _keys
from celery_serve.exceptions import DeploymentNotFoundError

_COUNT = re.compile(r'"serve_deliveries":\s*\d+,?')


@dataclass
class DeadLetter:
    app: str
    deployment: str
    queue: str
    job_id: str
    reason: str
    deliveries: int
    at: float
    message: str
    raw: bytes | str  # the entry as stored (to remove exactly this one)

    def to_dict(self, with_message: bool = False) -> dict[str, Any]:
        out = {
            "app": self.app,
            "deployment": self.deployment,
            "job_id": self.job_id,
            "reason": self.reason,
            "deliveries": self.deliveries,
            "at": self.at,
        }
        if with_message:
            out["message"] = self.message
        return out


def _deployments(client: redis.Redis, app: str | None, deployment: str | None) -> list[tuple[str, str, str]]:
    found = []
    for raw in client.hvals(_keys.APPS):
        spec = AppSpec.from_json(raw)
        if app not in (None, spec.name):
            continue
        for dep in spec.deployments.values():
            if deployment in (None, dep.name):
                found.append((spec.name, dep.name, dep.queue))
    if app is not None and not found:
        what = f"deployment '{deployment}' in application '{app}'" if deployment else f"application '{app}'"
        raise DeploymentNotFoundError(f"no {what} is deployed on this Redis")
    return found


def list_dead_letters(
    client: redis.Redis, app: str | None = None, deployment: str | None = None, limit: int = 1000
) -> list[DeadLetter]:
    """Entries of every matching deployment, newest first within each."""
    out = []
    for app_name, dep, queue in _deployments(client, app, deployment):
        for raw in client.lrange(_keys.dead_letters(app_name, dep), 0, limit - 1):
            entry = json.loads(raw)
            out.append(
                DeadLetter(
                    app=app_name,
                    deployment=dep,
                    queue=queue,
                    job_id=str(entry.get("job_id") or ""),
                    reason=str(entry.get("reason") or ""),
                    deliveries=int(entry.get("deliveries") or 0),
                    at=float(entry.get("at") or 0),
                    message=str(entry.get("message") or ""),
                    raw=raw,
                )
            )
    return out


def find(client: redis.Redis, job_id: str, app: str | None = None) -> DeadLetter:
    for entry in list_dead_letters(client, app, limit=_keys.DEAD_LETTERS_MAX):
        if entry.job_id == job_id:
            return entry
    raise DeploymentNotFoundError(f"no dead letter for job {job_id} (see `celery-serve dlq list`)")


def replay(client: redis.Redis, entry: DeadLetter) -> None:
    """Queue the message again under its job id, as if new: its delivery count reset, the job `queued`, its
    failure record removed (so the new result is the one callers read); the entry leaves the list."""
    message = _COUNT.sub("", entry.message, count=1)
    pipe = client.pipeline()  # MULTI: all or nothing
    pipe.lrem(_keys.dead_letters(entry.app, entry.deployment), 1, entry.raw)  # type: ignore[arg-type]
    if entry.job_id:
        pipe.delete(_keys.result(entry.job_id))
        pipe.hset(_keys.job(entry.job_id), mapping={"status": "queued", "replayed_at": time.time()})
        pipe.hdel(_keys.job(entry.job_id), "finished_at")
    pipe.lpush(entry.queue, message)
    pipe.execute()


def purge(client: redis.Redis, app: str | None = None, deployment: str | None = None) -> int:
    total = 0
    for app_name, dep, _ in _deployments(client, app, deployment):
        key = _keys.dead_letters(app_name, dep)
        pipe = client.pipeline()
        pipe.llen(key)
        pipe.delete(key)
        total += int(pipe.execute()[0])
    return total
