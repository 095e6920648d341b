"""Operating applications as Ray Serve users do: `status()`, `delete()` and `get_app_handle()`.

Everything here reads or writes Redis only, so it works from any process that reaches the service's Redis
(`serve.run()` in this process, `REDIS_URL`, or the run recorded in this folder).
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from celery_serve._runtime.spec import AppSpec
from celery_serve._wire import keys as _keys
from celery_serve._wire import lifecycle
from celery_serve._wire import results as _results
from celery_serve._wire import scripts as _scripts
from celery_serve._wire import stopped_apps as _stopped_apps
from celery_serve._wire.envelope import parse_message
from celery_serve.exceptions import BadRequestError, DeploymentNotFoundError
from celery_serve.schema import (
    ApplicationStatus,
    ApplicationStatusOverview,
    DeploymentStatus,
    DeploymentStatusOverview,
    ServeStatus,
)
from celery_serve.status import Snapshot, read_snapshot

logger = logging.getLogger(__name__)

DELETING = "serve:deleting"  # hash: application name -> JSON {at, route_prefix, deployments, queues}
DELETING_TTL_S = 600.0  # a DELETING entry whose replicas never report gone is dropped after this long


# --- status --------------------------------------------------------------------------------------------


def serve_status(client: Any, snapshot: Snapshot | None = None) -> ServeStatus:
    """Every application's and deployment's status, with Ray's values and a message saying why."""
    snapshot = snapshot if snapshot is not None else read_snapshot(client)
    specs = {s.name: s for s in (AppSpec.from_json(raw) for raw in client.hvals(_keys.APPS))}
    pairs = [(d.app, d.deployment) for d in snapshot.deployments]
    pipe = client.pipeline(transaction=False)
    for app, dep in pairs:
        pipe.get(lifecycle.deploy_failed(app, dep))
        pipe.get(lifecycle.unhealthy(app, dep))
        pipe.get(_keys.deployment_error(app, dep))
    replies = pipe.execute()
    result = ServeStatus()
    for i, dep_status in enumerate(snapshot.deployments):
        failed, unhealthy, error = (lifecycle.read(r) for r in replies[i * 3 : i * 3 + 3])
        spec = specs.get(dep_status.app)
        if spec is None:
            continue
        overview = result.applications.setdefault(
            dep_status.app,
            ApplicationStatusOverview(
                ApplicationStatus.RUNNING, last_deployed_time_s=spec.deployed_at, route_prefix=spec.route_prefix
            ),
        )
        overview.deployments[dep_status.deployment] = _deployment_overview(dep_status, failed, unhealthy, error)
    for name, overview in result.applications.items():
        _summarize(name, overview)
    for name, entry in _deleting(client, snapshot).items():
        result.applications.setdefault(
            name,
            ApplicationStatusOverview(
                ApplicationStatus.DELETING,
                message=f"stopping {entry['replicas']} replicas",
                route_prefix=entry.get("route_prefix"),
            ),
        )
    for stopped in _stopped_apps.recent(client.hgetall(_keys.STOPPED)):
        if stopped.app not in result.applications:
            result.applications[stopped.app] = _stopped_overview(client, stopped)
    return result


def _stopped_overview(client: Any, stopped: _stopped_apps.Stopped) -> ApplicationStatusOverview:
    """An application whose run stopped (not deleted): requests for it get 503 until it runs again. Ray has no
    such state; NOT_STARTED is its value for an application that is not running."""
    ago = max(time.time() - stopped.at, 0.0)
    finishing = _live_replicas(client, stopped.app, list(stopped.deployments))
    message = f"its run stopped {ago:.0f} s ago; requests get 503 until it runs again (serve.delete removes it)"
    if finishing:
        message += f"; {finishing} replicas are finishing what they took"
    return ApplicationStatusOverview(ApplicationStatus.NOT_STARTED, message=message, route_prefix=stopped.route_prefix)


def _deployment_overview(
    status: Any, failed: dict[str, Any] | None, unhealthy: dict[str, Any] | None, error: dict[str, Any] | None
) -> DeploymentStatusOverview:
    starting = max(0, status.replicas - status.ready)
    states = {"RUNNING": status.ready, "STARTING": starting}
    if failed is not None:  # its pool no longer starts replicas
        states = {"RUNNING": status.ready, "STARTING": 0}
        return DeploymentStatusOverview(DeploymentStatus.DEPLOY_FAILED, str(failed.get("message")), states)
    if unhealthy is not None:
        return DeploymentStatusOverview(DeploymentStatus.UNHEALTHY, str(unhealthy.get("message")), states)
    if status.ready < status.desired:
        message = f"{status.ready} of {status.desired} replicas ready"
        if not status.workers:
            message += (
                f"; no worker serves it yet (`celery-serve worker --app-name {status.app} "
                f"--deployment {status.deployment}`)"
            )
        if error is not None:
            message += f"; the last replica failed to start: {error.get('message')} (retrying)"
        scaling_up = status.autoscaling is not None and status.ready > 0
        kind = DeploymentStatus.UPSCALING if scaling_up else DeploymentStatus.UPDATING
        return DeploymentStatusOverview(kind, message, states)
    if status.autoscaling is not None and status.ready > status.desired:
        return DeploymentStatusOverview(
            DeploymentStatus.DOWNSCALING, f"{status.ready} replicas, scaling to {status.desired}", states
        )
    return DeploymentStatusOverview(DeploymentStatus.HEALTHY, "", states)


def _summarize(name: str, overview: ApplicationStatusOverview) -> None:
    by_status: dict[DeploymentStatus, list[str]] = {}
    for dep, d in overview.deployments.items():
        by_status.setdefault(d.status, []).append(dep)
    if DeploymentStatus.DEPLOY_FAILED in by_status:
        dep = by_status[DeploymentStatus.DEPLOY_FAILED][0]
        overview.status = ApplicationStatus.DEPLOY_FAILED
        overview.message = (
            f"deploying application '{name}' failed: deployment '{dep}': {overview.deployments[dep].message}"
        )
    elif DeploymentStatus.UNHEALTHY in by_status:
        overview.status = ApplicationStatus.UNHEALTHY
        overview.message = f"the deployments {sorted(by_status[DeploymentStatus.UNHEALTHY])} are UNHEALTHY"
    elif DeploymentStatus.UPDATING in by_status:
        overview.status = ApplicationStatus.DEPLOYING
        overview.message = f"waiting for the deployments {sorted(by_status[DeploymentStatus.UPDATING])}"


def _deleting(client: Any, snapshot: Snapshot) -> dict[str, dict[str, Any]]:
    """Applications being deleted whose replicas still run (entries whose replicas are gone are removed)."""
    entries = {_text(k): json.loads(v) for k, v in client.hgetall(DELETING).items()}
    live: dict[str, dict[str, Any]] = {}
    for name, entry in entries.items():
        replicas = _live_replicas(client, name, entry.get("deployments") or [])
        if replicas and time.time() - float(entry.get("at") or 0) < DELETING_TTL_S:
            live[name] = {**entry, "replicas": replicas}
        else:
            client.hdel(DELETING, name)
    return live


def alive_replicas(client: Any, app: str, deployment: str) -> set[str]:
    """Ids of the deployment's replicas whose heartbeat has not run out."""
    return {_text(r) for r in client.zrangebyscore(_keys.heartbeats(app, deployment), time.time(), "+inf")}


def _live_replicas(client: Any, app: str, deployments: list[str]) -> int:
    return sum(len(alive_replicas(client, app, dep)) for dep in deployments)


def status_lines(status: ServeStatus) -> list[str]:
    """`celery-serve status`: each application's and deployment's status and why, as Ray's `serve status`."""
    if not status.applications:
        return ["no applications are deployed"]
    lines = []
    for name, app in sorted(status.applications.items()):
        lines.append(f"{name}: {app.status.value}" + (f" - {app.message}" if app.message else ""))
        for dep, d in sorted(app.deployments.items()):
            counts = ", ".join(f"{n} {state.lower()}" for state, n in d.replica_states.items())
            lines.append(f"  {dep}: {d.status.value} ({counts})" + (f" - {d.message}" if d.message else ""))
    return lines


# --- delete --------------------------------------------------------------------------------------------


def delete_application(client: Any, name: str) -> AppSpec | None:
    """Remove an application: its routes go at once (gateways hear it on pub/sub), every request still
    queued for it ends with `DeploymentNotFoundError`, and its pools stop its replicas (they notice the spec
    is gone). Returns the removed spec; None when only the note of a run that stopped it was left (see
    `_wire.stopped_apps`: removed, and its queued requests ended); `DeploymentNotFoundError` if neither."""
    raw = client.hget(_keys.APPS, name)
    if raw is None:
        stopped = _stopped_apps.parse(name, client.hget(_keys.STOPPED, name) or "")
        if stopped is not None and client.hdel(_keys.STOPPED, name):
            fail_queued(client, name, list(stopped.queues))
            client.publish(_keys.APPS_CHANGED, name)  # gateways drop the note: 404 from now on
            return None
        known = sorted(_text(k) for k in client.hkeys(_keys.APPS))
        raise DeploymentNotFoundError(
            f"no application named '{name}' is deployed (deployed: {', '.join(known) or 'none'})"
        )
    spec = AppSpec.from_json(raw)
    queues = sorted({d.queue for d in spec.deployments.values()})
    entry = {"at": time.time(), "route_prefix": spec.route_prefix, "deployments": sorted(spec.deployments)}
    entry["queues"] = queues
    pipe = client.pipeline()
    pipe.hset(DELETING, name, json.dumps(entry))
    pipe.hdel(_keys.APPS, name)
    pipe.hdel(_keys.STOPPED, name)  # meant to be gone: 404 from now on, not 503 "stopped"
    pipe.hdel(_keys.OPENAPI, name)
    for dep in spec.deployments:
        for key in (  # one key per DEL: on a cluster they live in different slots
            lifecycle.unhealthy(name, dep),
            lifecycle.deploy_failed(name, dep),
            lifecycle.constructor_failures(name, dep),
            _keys.deployment_error(name, dep),
        ):
            pipe.delete(key)
    pipe.execute()
    client.publish(_keys.APPS_CHANGED, name)  # after: a cluster pipeline cannot carry PUBLISH
    fail_queued(client, name, queues)
    return spec


def fail_queued(client: Any, app: str, queues: list[str]) -> int:
    """End every request waiting in the queues of a deleted application with a clear error. Returns how many."""
    finish = client.register_script(_scripts.FINISH)
    ended = 0
    for queue in queues:
        # MULTI (one key: one slot on a cluster too): a message is taken here or by a replica, never both
        pipe = client.pipeline(transaction=True)
        pipe.lrange(queue, 0, -1)
        pipe.delete(queue)
        messages, _ = pipe.execute()
        for raw in messages:
            try:
                env = parse_message(raw)
            except BadRequestError as exc:
                logger.warning("dropping an unreadable message of deleted application '%s': %s", app, exc)
                continue
            error = DeploymentNotFoundError(
                f"application '{app}' was deleted before this request to '{env.task_name}' ran"
            ).to_dict()
            record = _results.failure(env.job_id, error, 404)
            before = finish(
                keys=[_keys.job(env.job_id), _keys.result(env.job_id)],
                args=[time.time(), record, env.retention_s, "failed", 0],
            )
            if _text(before) == "missing":  # no job record: answer the waiter directly
                if client.set(_keys.result(env.job_id), record, nx=True, ex=env.retention_s):
                    client.publish(_keys.result(env.job_id), record)
                    if env.reply_to and env.reply_to.startswith(_keys.REPLY_PREFIX):
                        client.lpush(env.reply_to, record)
                        client.expire(env.reply_to, 3600)
            ended += 1
    if ended:
        logger.warning("ended %d queued requests of deleted application '%s'", ended, app)
    return ended


def deleted_queues(client: Any, app: str) -> list[str] | None:
    """The queues of an application being deleted (None when it is not being deleted)."""
    raw = client.hget(DELETING, app)
    return None if raw is None else list(json.loads(raw).get("queues") or [])


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
