"""Every Redis key and queue name celery-serve uses, in one place.

Queues are plain Redis lists named like Celery queues (kombu's Redis transport uses the queue name as the
list key), so `celery inspect`, Flower and any Celery client see them. Results use Celery's result-backend
key, so `celery.result.AsyncResult(task_id)` reads them too.

Hash slots (Redis Cluster keeps a script's keys in one slot): a deployment's keys carry its CPU queue's name as
their hash tag (`serve:inflight:{serve.shop.Cart}:<replica>`), so they share the queue's slot; a request's keys
carry its result key as theirs (`serve:job:{celery-task-meta-<id>}`), so they share the result's slot. On a
cluster, request ids are chosen so that slot is their deployment's (`celery_serve._wire.slots`): every script
then touches one slot, and different deployments spread over the shards.
"""

from __future__ import annotations

APPS = "serve:apps"  # hash: application name -> JSON spec
APPS_CHANGED = "serve:apps:changed"  # pub/sub channel: an application was deployed or deleted
GATEWAYS = "serve:gateways"  # hash: gateway id -> JSON {url, started_at}
# hash: run session id -> the time (epoch s) until which that run is known alive; in APPS's slot (CLAIM_APP
# reads both in one script)
OWNERS = "serve:owners:{serve:apps}"
# hash: application name -> JSON note {at, route_prefix, deployments, queues} left by a run that stopped it (see
# `_wire.stopped_apps`); in APPS's slot (RELEASE_APP writes both in one script)
STOPPED = "serve:stopped:{serve:apps}"
OPENAPI = "serve:openapi"  # hash: application name -> its FastAPI ingress's OpenAPI schema (JSON)
RESULT_PREFIX = "celery-task-meta-"
# A random value set once (SET NX) and never expired: when it changes or vanishes, Redis lost its data (restarted
# without persistence, flushed). Workers then re-announce their applications and gateways keep their routes
# and tell waiting callers their requests were lost, instead of answering 404 until someone redeploys. In
# APPS's slot: on a cluster, the shard whose loss would make every application vanish is the one it watches.
EPOCH = "serve:epoch:{serve:apps}"


def queue(app: str, deployment: str, gpu: bool = False) -> str:
    """A deployment's queue; GPU deployments get their own kind, consumed only by GPU workers (in the same slot)."""
    return f"serve.gpu.{_tag(app, deployment)}" if gpu else f"serve.{app}.{deployment}"


def _tag(app: str, deployment: str) -> str:
    """The hash tag of a deployment's keys: its CPU queue's name, which a key without braces hashes whole."""
    return "{serve." + app + "." + deployment + "}"


def _request_tag(task_id: str) -> str:
    """The hash tag of a request's keys: its result key."""
    return "{" + RESULT_PREFIX + task_id + "}"


def deployment_slot_key(app: str, deployment: str) -> str:
    """A key in the deployment's hash slot (its CPU queue's name)."""
    return f"serve.{app}.{deployment}"


def task_name(app: str, deployment: str, method: str) -> str:
    return f"{app}.{deployment}.{method}"


def result(task_id: str) -> str:
    return RESULT_PREFIX + task_id


def reply(waiter_id: str) -> str:
    return f"serve:reply:{waiter_id}"


REPLY_PREFIX = "serve:reply:"


def reply_in_slot(waiter_id: str, app: str, deployment: str) -> str:
    """A process's reply list for requests in a deployment's slot (on a Redis Cluster, where a script may push
    only to a list in the slot of the request it answers)."""
    return f"{REPLY_PREFIX}{_tag(app, deployment)}:{waiter_id}"


def replicas(app: str, deployment: str) -> str:
    """Hash: replica id -> JSON {pid, host, started_at}; the replicas registered for a deployment."""
    return f"serve:replicas:{_tag(app, deployment)}"


def heartbeats(app: str, deployment: str) -> str:
    """Sorted set: replica id -> the time (Redis clock, epoch s) until which the replica is known alive.

    Each heartbeat pushes its replica's score forward (and re-registers it); a score in the past means the
    replica stopped: one reaper at a time finds those with a single range query (O(stale), not O(replicas^2)).
    """
    return f"serve:heartbeats:{_tag(app, deployment)}"


def reaper_lease(app: str, deployment: str) -> str:
    """The id of the replica that reaps stale replicas of a deployment for now (short TTL, renewed)."""
    return f"serve:reaper:{_tag(app, deployment)}"


def dead_letters(app: str, deployment: str) -> str:
    """List: JSON entries {task_id, job_id, reason, deliveries, at, message} for requests that were given up
    on (a request that kept killing its replica, a message no replica can read), newest first."""
    return f"serve:dlq:{_tag(app, deployment)}"


DEAD_LETTERS_MAX = 10_000  # entries kept per deployment (oldest dropped first)


def replica_claim(app: str, deployment: str, replica_id: str) -> str:
    """List a replica's blocking pop moves a message into, before it is recorded as in flight."""
    return f"serve:claim:{_tag(app, deployment)}:{replica_id}"


def replica_inflight(app: str, deployment: str, replica_id: str) -> str:
    """Hash: token -> raw message, for messages taken by a replica and not yet acknowledged."""
    return f"serve:inflight:{_tag(app, deployment)}:{replica_id}"


def deployment_error(app: str, deployment: str) -> str:
    """Why the deployment's last replica failed to start (short TTL), so `run` can say it."""
    return f"serve:error:{_tag(app, deployment)}"


def replica_stats(app: str, deployment: str) -> str:
    """Hash: replica id -> JSON counters (requests, batches, batch size histogram), refreshed by heartbeats."""
    return f"serve:stats:{_tag(app, deployment)}"


# What a script prepends and appends to a request id to name its job hash (see `job`).
JOB_PREFIX = "serve:job:{" + RESULT_PREFIX
JOB_SUFFIX = "}"
# ... and its streamed response's Redis Stream (see `celery_serve._wire.streams`).
STREAM_PREFIX = "serve:stream:{" + RESULT_PREFIX


def job(task_id: str) -> str:
    """Hash: status, app, deployment, method, timestamps, retention; one per request (sync or async)."""
    return f"serve:job:{_request_tag(task_id)}"


def alias(request_id: str) -> str:
    """On a Redis Cluster: a caller-chosen request id (`X-Request-ID`) -> the id its job is stored under.

    A request's keys must be in its deployment's slot, and a chosen id fixes the slot of keys named after it, so
    there the request is stored under an id the gateway chooses in the right slot, and this key (in the chosen
    id's own slot) leads reads of the chosen id to it. Unused on a single Redis."""
    return "serve:alias:{" + request_id + "}"


def idempotency(app: str, deployment: str, key: str) -> str:
    return f"serve:idem:{_tag(app, deployment)}:{key}"


def cancel_channel(app: str, deployment: str) -> str:
    """Pub/sub channel on which replicas hear that a running job was cancelled."""
    return f"serve:cancel:{app}:{deployment}"


def chord(job_id: str, group_id: str) -> str:
    """Hash: the results of a parallel pipeline step's branches (r0, r1, ...) and whether it fired."""
    return f"serve:chord:{_request_tag(job_id)}:{group_id}"


# --- scaling and observability -----------------------------------------------------------------------

WORKERS = "serve:workers"  # hash: worker hostname -> JSON {app, deployment, machine, pool_size, capacity...}
SCALER_LEADER = "serve:scaler:leader"  # the acting scaler's id, with a short TTL it keeps renewing


def worker_alive(hostname: str) -> str:
    """A key with a short TTL that a deployment's worker refreshes; gone means the worker is gone."""
    return f"serve:worker-alive:{hostname}"


def autoscale_state(app: str, deployment: str) -> str:
    """Hash: the scaler's last decision (desired, replicas, reason, inputs) and its pending delay timers."""
    return f"serve:autoscale:{_tag(app, deployment)}"


def history(app: str, deployment: str) -> str:
    """List: recent JSON samples {t, requests, errors, queued, in_flight, replicas}, newest first."""
    return f"serve:history:{_tag(app, deployment)}"


TASK_EVENTS = "serve:task-events"  # exists (short TTL) while a monitor asks for task events (enable_events)
