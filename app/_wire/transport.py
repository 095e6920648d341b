"""Sending requests to deployments' queues and awaiting their results, on one asyncio event loop.

Used by the gateway (on uvicorn's loop) and by handles and the client (on a background loop). Results come
back on the caller's own reply list, which one listener drains in batches: no thread and no connection per
waiting request, no polling.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import redis.exceptions

from celery_serve._runtime.spec import AppSpec, DeploymentSpec
from celery_serve._wire import keys as _keys
from celery_serve._wire import results as _results
from celery_serve._wire import scripts as _scripts
from celery_serve._wire import stopped_apps as _stopped_apps
from celery_serve._wire.affinity import AffinityRouter, model_id_from_http
from celery_serve._wire.connections import BLOCK_S, REDIS_FAULTS, async_client, interrupt, is_cluster, node_client
from celery_serve._wire.envelope import build_message, new_task_id, parallel_signature, signature
from celery_serve._wire.jobs import expiry_grace_s
from celery_serve._wire.slots import key_slot, task_id_for
from celery_serve._wire.streams import stream_hub
from celery_serve._wire.submit_batches import EnqueueBatcher
from celery_serve.exceptions import (
    BackpressureError,
    DeploymentConfigError,
    DeploymentNotFoundError,
    RequestIdInUseError,
    RequestTimeoutError,
    ServiceUnavailableError,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReplicaWait:
    """How many Redis replicas must hold a request before it counts as accepted (0: do not wait)."""

    replicas: int = 0
    timeout_ms: int = 1000

    @classmethod
    def from_env(cls, replicas: int | None = None, timeout_ms: int | None = None) -> ReplicaWait:
        def read(name: str, given: int | None, default: int, low: int) -> int:
            raw = given if given is not None else os.environ.get(name)
            if raw in (None, ""):
                return default
            try:
                value = int(raw)
            except (TypeError, ValueError):
                value = low - 1
            if not low <= value <= 100_000:
                raise DeploymentConfigError(f"{name} must be an integer >= {low}, got {raw!r}")
            return value

        return cls(
            read("SERVE_REDIS_WAIT_REPLICAS", replicas, 0, 0), read("SERVE_REDIS_WAIT_TIMEOUT_MS", timeout_ms, 1000, 1)
        )


_DRAIN = 512
_SPEC_TTL_S = 2.0
# How often a process looks for the requests it waits on whose job Redis no longer has, and how long a request
# waits before it is looked at: most are answered well within this, and the look costs one EXISTS per request.
_LOST_SWEEP_S = 2.0
_LOST_SWEEP_MAX = 256  # requests looked at per sweep, at most (a random sample of a long backlog): bounded cost


class ResultWaiter:
    """Resolves futures by task id from records pushed to this process's reply list.

    On one Redis (or Sentinel) a process has one reply list. On a cluster a script may only push to a list in
    its request's slot, so a process has one reply list (and one listener) per deployment slot it sends to,
    made when it first sends there (`reply_key`)."""

    def __init__(self, url: str) -> None:
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._cluster = is_cluster(url)
        self._plain_key = _keys.reply(self.id)
        self._url = url
        self._futures: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._accepted_at: dict[str, float] = {}  # when each awaited request was known to be queued
        self._listeners: dict[str, asyncio.Task[None]] = {}
        self._conn: Any = None
        self._closing = False
        self._multi_pop = True  # BLMPOP until the server says it has none

    @property
    def pending(self) -> int:
        return len(self._futures)

    def reply_key(self, app: str, deployment: str) -> str:
        """The reply list for a request whose keys are in this deployment's slot (listened to from now on)."""
        key = _keys.reply_in_slot(self.id, app, deployment) if self._cluster else self._plain_key
        if key not in self._listeners and not self._closing:
            self._listeners[key] = asyncio.create_task(self._listen(key), name=f"reply-listener {key}")
        return key

    async def start(self) -> None:
        self._conn = async_client(self._url, single_connection=True)
        if not self._cluster:
            self.reply_key("", "")

    async def close(self) -> None:
        # Disconnecting ends the blocked BLPOP at once (cancelling a blocked read in redis-py can hang).
        self._closing = True
        if self._listeners:
            await interrupt(self._conn)
            await asyncio.wait(self._listeners.values(), timeout=1.0)
            for task in self._listeners.values():
                task.cancel()
        if self._conn is not None:
            await self._conn.aclose()
        for fut in self._futures.values():
            fut.cancel()
        self._futures.clear()
        self._accepted_at.clear()

    def expect(self, task_id: str) -> asyncio.Future[dict[str, Any]]:
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._futures[task_id] = fut
        return fut

    def accepted(self, task_id: str) -> None:
        """The awaited request is queued (its job exists from now on, until it ends and its retention passes)."""
        if task_id in self._futures:
            self._accepted_at[task_id] = time.monotonic()

    def discard(self, task_id: str) -> None:
        self._futures.pop(task_id, None)
        self._accepted_at.pop(task_id, None)

    def pending_ids(self) -> list[str]:
        return list(self._futures)

    def awaits(self, task_id: str) -> bool:
        return task_id in self._futures

    def accepted_before(self, seconds_ago: float) -> list[str]:
        """The awaited requests queued more than `seconds_ago` seconds ago."""
        until = time.monotonic() - seconds_ago
        return [task_id for task_id, at in self._accepted_at.items() if at <= until]

    def fail(self, task_id: str, record: dict[str, Any]) -> None:
        self._accepted_at.pop(task_id, None)
        fut = self._futures.pop(task_id, None)
        if fut is not None and not fut.done():
            fut.set_result(record)

    async def _listen(self, key: str) -> None:
        while not self._closing:
            try:
                for raw in await self._pop(self._conn, key):
                    self._resolve(raw)
            except REDIS_FAULTS as exc:
                if self._closing:
                    return
                logger.warning("reply listener lost Redis (%r); reconnecting", exc)
                await asyncio.sleep(0.5)

    async def _pop(self, conn: Any, key: str) -> list[Any]:
        """The records waiting on the reply list (up to _DRAIN), blocking up to BLOCK_S for the first: one round
        trip with BLMPOP (Redis >= 7.0); BLPOP and then LPOP for the rest on older servers."""
        if self._multi_pop:
            try:
                got = await conn.blmpop(BLOCK_S, 1, key, direction="LEFT", count=_DRAIN)
            except redis.exceptions.ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                logger.info("Redis has no BLMPOP (it is older than 7.0): the reply listener uses BLPOP and LPOP")
                self._multi_pop = False
            else:
                return list(got[1]) if got else []
        got = await conn.blpop([key], timeout=BLOCK_S)
        if got is None:
            return []
        records = [got[1]]
        while len(records) < _DRAIN:
            more = await conn.lpop(key, _DRAIN - len(records))
            if not more:
                break
            records += more
        return records

    def _resolve(self, raw: Any) -> None:
        record = _results.decode(raw)  # wide integers exact
        self._accepted_at.pop(record.get("task_id") or "", None)
        fut = self._futures.pop(record.get("task_id") or "", None)
        if fut is not None and not fut.done():
            fut.set_result(record)


@dataclass
class Submitted:
    """A request on its way: its id, the future its result arrives on, and its deadline."""

    task_id: str
    future: asyncio.Future[dict[str, Any]]
    deadline: float
    existing: bool = False  # an idempotency key matched an earlier job; nothing new was queued
    alias: str | None = None  # on a cluster, the caller's chosen id when the job is stored under `task_id`

    @property
    def request_id(self) -> str:
        """The id the caller knows the request by (and reads its job with): its chosen one, if it chose one."""
        return self.alias or self.task_id


def _id_in_use(request_id: str) -> RequestIdInUseError:
    return RequestIdInUseError(
        f"request id '{request_id}' already names a job; choose a new X-Request-ID "
        f"(GET /jobs/{request_id} reads the existing one)"
    )


def target_name(target: DeploymentSpec | AppSpec) -> str:
    """A deployment's name, or a pipeline's ('A >> B >> C')."""
    return target.ingress if isinstance(target, AppSpec) else target.name


def _deployments_of(target: DeploymentSpec | AppSpec) -> list[DeploymentSpec]:
    if isinstance(target, AppSpec):
        return [target.deployments[name] for stage in target.pipeline or [] for name in stage]
    return [target]


def _queue_limit(configs: list[dict[str, Any]]) -> int:
    """The tightest `max_queued_requests` among the deployments a request enters (-1: unbounded)."""
    bounded = [int(c["max_queued_requests"]) for c in configs if int(c["max_queued_requests"]) >= 0]
    return min(bounded) if bounded else -1


def _queue_full(name: str, limit: int) -> BackpressureError:
    return BackpressureError(
        f"deployment '{name}' already has {limit} requests waiting; "
        "retry shortly or raise max_queued_requests / num_replicas"
    )


def slot_of(target: DeploymentSpec | AppSpec) -> tuple[str, str]:
    """(application, deployment) whose hash slot a request for `target` lives in: the deployment's own, or a
    pipeline's first step's (its first message goes there, and its job's keys go with it)."""
    if isinstance(target, DeploymentSpec):
        return target.app, target.name
    return target.name, (target.pipeline or [[target.ingress]])[0][0]


def _pipeline_messages(
    spec: AppSpec, job_id: str, common: dict[str, Any], cluster: bool = False
) -> list[tuple[str, str]]:
    """The first step's message(s) of a pipeline request, each carrying the rest of the chain.

    On a cluster each later step's task id is in its own deployment's slot: a replica of that step then
    touches only its own slot in one script call (see `ReplicaRedis.forward`), and a parallel first step's
    branches name the job as one in another slot (`job_elsewhere`), as a forwarded step's do."""
    stages: list[dict[str, Any]] = []
    for stage in spec.pipeline or []:

        def step_id(name: str) -> str:
            return task_id_for(spec.name, name) if cluster else new_task_id()

        steps = [signature(step_id(name), spec.name, name, spec.deployments[name].queue) for name in stage]
        stages.append(steps[0] if len(steps) == 1 else parallel_signature(new_task_id(), steps))
    first, chain = stages[0], list(reversed(stages[1:]))
    if first.get("subtask_type") != "serve_parallel":
        return [
            (
                first["options"]["queue"],
                build_message(
                    task_id=job_id,
                    app=spec.name,
                    deployment=first["serve"]["deployment"],
                    queue=first["options"]["queue"],
                    job_id=job_id,
                    chain=chain,
                    method="__call__",
                    **common,
                ),
            )
        ]
    key = _keys.chord(job_id, first["options"]["group_id"])
    return [
        (
            step["options"]["queue"],
            build_message(
                task_id=step["options"]["task_id"],
                app=spec.name,
                deployment=step["serve"]["deployment"],
                queue=step["options"]["queue"],
                method="__call__",
                job_id=job_id,
                chain=chain,
                chord={"key": key, "index": index, "size": len(first["tasks"])},
                job_elsewhere=cluster,
                **common,
            ),
        )
        for index, step in enumerate(first["tasks"])
    ]


class QueueTransport:
    """Enqueue a request for a deployment and await its result record.

    With `wait_replicas=N` (default `SERVE_REDIS_WAIT_REPLICAS`), a request counts as accepted only once N
    Redis replicas hold it (`WAIT` right after the enqueue, on its connection): a failover then loses no
    accepted request. When fewer confirm within `wait_timeout_ms`, the request is withdrawn (if no replica
    started it) and the submit fails as Redis being unavailable (503).
    """

    def __init__(self, url: str, *, wait_replicas: int | None = None, wait_timeout_ms: int | None = None) -> None:
        self.url = url
        self.redis = async_client(url)
        self.waiter = ResultWaiter(url)
        self.streams = stream_hub(url)  # follows streamed responses (celery_serve._wire.streams)
        self._enqueue = self.redis.register_script(_scripts.ENQUEUE)
        self._batcher = EnqueueBatcher(self._enqueue)  # submits that come together: one ENQUEUE call
        self.affinity = AffinityRouter(self.redis)
        self._finish = self.redis.register_script(_scripts.FINISH)
        self._specs: dict[str, tuple[float, AppSpec]] = {}
        durability = ReplicaWait.from_env(wait_replicas, wait_timeout_ms)
        self.wait_replicas, self.wait_timeout_ms = durability.replicas, durability.timeout_ms
        self.cluster = is_cluster(url)
        self._slot_batchers: dict[int, EnqueueBatcher] = {}
        self._node_clients: dict[str, Any] = {}  # on a cluster, with a replica wait: a plain client per node
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.waiter.start()
        self._sweeper = asyncio.create_task(self._sweep_lost(), name="lost-requests")

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.wait([self._sweeper], timeout=1.0)
        await self.waiter.close()
        await self.streams.close()
        for client in self._node_clients.values():
            await client.aclose()
        await self.redis.aclose()

    async def app_spec(self, app: str, *, refresh: bool = False) -> AppSpec:
        cached = self._specs.get(app)
        if cached and not refresh and time.monotonic() - cached[0] < _SPEC_TTL_S:
            return cached[1]
        raw = await self.redis.hget(_keys.APPS, app)
        if raw is None:
            self._specs.pop(app, None)
            stopped = _stopped_apps.parse(app, await self.redis.hget(_keys.STOPPED, app) or "")
            if stopped is not None and stopped.recent:  # its run is stopping or restarting: retry
                raise stopped.error()
            raise DeploymentNotFoundError(f"no application named '{app}' is deployed")
        spec = AppSpec.from_json(raw)
        self._specs[app] = (time.monotonic(), spec)
        return spec

    async def target(self, app: str, name: str) -> DeploymentSpec | AppSpec:
        """A deployment by name, or the application itself when `name` is its pipeline."""
        spec = await self.app_spec(app)
        if spec.is_pipeline and name == spec.ingress:
            return spec
        return await self.deployment(app, name)

    async def deployment(self, app: str, name: str) -> DeploymentSpec:
        spec = await self.app_spec(app)
        if name not in spec.deployments:
            spec = await self.app_spec(app, refresh=True)
        try:
            return spec.deployments[name]
        except KeyError:
            known = ", ".join(sorted(spec.deployments))
            raise DeploymentNotFoundError(
                f"application '{app}' has no deployment named '{name}' (it has: {known})"
            ) from None

    async def submit(
        self,
        target: DeploymentSpec | AppSpec,
        method: str = "__call__",
        args: list[Any] | tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        http: dict[str, Any] | None = None,
        task_id: str | None = None,
        timeout_s: float | None = None,
        expect_reply: bool = True,
        job: bool = False,
        idempotency_key: str | None = None,
        multiplexed_model_id: str = "",
        stream: str | None = None,
    ) -> Submitted:
        """Put one request on its deployment's queue (for a pipeline, on its first step's queues).

        Every request is a job (`GET /jobs/{id}` finds it); `job=True` marks an asynchronous job, kept
        for the deployment's `job_retention_s` instead of `request_retention_s`. With an idempotency key,
        a repeated submit returns the first job's id and enqueues nothing. With `expect_reply=False` the
        future is never resolved here (the result is only stored).
        """
        configs = [d.config for d in _deployments_of(target)]
        # One deadline for the whole request: a pipeline gets its strictest step's timeout.
        timeout = timeout_s if timeout_s is not None else min(c["request_timeout_s"] for c in configs)
        retention = max(int(c.get("job_retention_s" if job else "request_retention_s") or 86400) for c in configs)
        limit = _queue_limit(configs)
        app, slot_deployment = slot_of(target)
        job_id = task_id if task_id and self._in_slot(task_id, target) else self.new_id(target)
        alias = task_id if task_id and task_id != job_id else None
        now = time.time()
        deadline = now + timeout
        if alias:  # a chosen id on a cluster: it leads to the job, for as long as the job can be
            await self._claim_alias(alias, job_id, math.ceil(timeout + expiry_grace_s()) + retention)
        reply = self.waiter.reply_key(app, slot_deployment) if expect_reply else None
        common: dict[str, Any] = {
            "args": args,
            "kwargs": kwargs,
            "deadline": deadline,
            "reply_to": reply,
            "http": http,
            "retention_s": retention,
            "stream": stream,
        }
        if isinstance(target, AppSpec):
            messages = _pipeline_messages(target, job_id, common, self.cluster)
            name, method = target.ingress, "__call__"
        else:
            multiplexed_model_id = multiplexed_model_id or model_id_from_http(http)
            queue = await self.affinity.queue_for(target, multiplexed_model_id)  # see _wire/affinity.py
            messages = [
                (
                    queue,
                    build_message(
                        task_id=job_id,
                        app=target.app,
                        deployment=target.name,
                        method=method,
                        queue=target.queue,
                        model_id=multiplexed_model_id,
                        **common,
                    ),
                )
            ]
            name = target.name
        # On a cluster a parallel first step's other branches are in other slots: queued once the job is accepted.
        later = messages[1:] if self.cluster else []
        if later:
            messages = messages[:1]
            await self._check_room(later, limit, name)
        if self.waiter.awaits(job_id):  # a chosen id sent twice at once through this process: one future per id
            await self._drop_alias(alias, unless_job=job_id)
            raise _id_in_use(task_id or job_id)
        fut = self.waiter.expect(job_id) if expect_reply else asyncio.get_running_loop().create_future()
        if not idempotency_key:
            idem_key = _keys.job(job_id)
        elif isinstance(target, AppSpec):  # in the slot of the pipeline's first step, with its other keys
            idem_key = _keys.idempotency(app, slot_deployment, f"{name}:{idempotency_key}")
        else:
            idem_key = _keys.idempotency(app, name, idempotency_key)
        keys = [_keys.job(job_id), idem_key, *(q for q, _ in messages)]
        args = [
            limit, job_id, now, retention, app, name, method, deadline,
            1 if idempotency_key else 0, reply or "", "async" if job else "sync",
            *(m for _, m in messages),
        ]  # fmt: skip
        try:
            if self.wait_replicas:
                depth, existing = await self._enqueue_replicated(job_id, name, keys, args, retention)
            else:
                depth, existing = await self._batcher_for(app, slot_deployment).enqueue(keys, args)
        except BaseException:
            self.waiter.discard(job_id)
            # not known to be accepted (refused, a Redis fault, the caller gone): the chosen id is free again, unless
            # the job is there after all, which the id must then keep leading to, as it would on a single Redis
            await self._drop_alias(alias, unless_job=job_id)
            raise
        if depth == 0:
            self.waiter.discard(job_id)
            await self._drop_alias(alias)  # the earlier job's id answers, as on a single Redis
            return Submitted(existing.decode(), fut, deadline, existing=True)
        # depth == -2: our own enqueue already ran (a retry after a reset connection): it is queued once.
        if depth == -3:  # another request chose this id a moment before (its check and ours both found it free)
            self.waiter.discard(job_id)
            raise _id_in_use(task_id or job_id)
        if depth == -1:
            self.waiter.discard(job_id)
            await self._drop_alias(alias)
            raise _queue_full(name, limit)
        if later:
            await self._queue_other_branches(job_id, name, later, retention)
        self.waiter.accepted(job_id)
        if isinstance(target, DeploymentSpec) and messages[0][0] != target.queue:  # on a model's queue
            await self.affinity.announce(target.queue, multiplexed_model_id)
        return Submitted(job_id, fut, deadline, alias=alias)

    async def _check_room(self, queued: list[tuple[str, str]], limit: int, name: str) -> None:
        """Refuse a request whose parallel first step would overfill a branch's queue in another slot (read just
        before the enqueue, so a burst may overshoot by a few: each queue's own slot is checked atomically)."""
        if limit < 0:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for queue, _ in queued:
                pipe.llen(queue)
            depths = await pipe.execute()
        if any(int(depth) >= limit for depth in depths):
            raise _queue_full(name, limit)

    async def _queue_other_branches(
        self, job_id: str, name: str, queued: list[tuple[str, str]], retention: int
    ) -> None:
        """Queue a parallel first step's branches in other cluster slots, after its job (with the first branch)
        was accepted in its own. If they cannot be queued, the job is ended (its first branch then goes no
        further) and the submit fails as Redis being unavailable (503): an accepted job never waits forever for
        a branch that was never queued. A gateway that dies in between leaves the job to its deadline."""
        try:
            if self.wait_replicas:  # each branch confirmed by its own shard's replicas, as the job was
                for queue, message in queued:
                    await self._push_replicated(queue, message)
            else:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for queue, message in queued:
                        pipe.lpush(queue, message)
                    await pipe.execute()
        except REDIS_FAULTS as exc:
            self.waiter.discard(job_id)
            error = {
                "exc_type": "ServiceUnavailableError",
                "exc_message": f"request to '{name}' was not accepted: its parallel first step could not be queued "
                f"on every Redis Cluster shard ({exc!r}); retry it",
                "exc_module": "celery_serve.exceptions",
            }
            try:
                await self._finish(
                    keys=[_keys.job(job_id), _keys.result(job_id)],
                    args=[time.time(), _results.failure(job_id, error, 503), retention, "cancelled", 0],
                )
            except REDIS_FAULTS as again:
                logger.warning("could not end job %s whose branches were not queued: %r", job_id, again)
            raise ServiceUnavailableError(error["exc_message"]) from exc

    def new_id(self, target: DeploymentSpec | AppSpec) -> str:
        """A new request id for `target` (on a cluster, one whose keys fall in the target's slot)."""
        if not self.cluster:
            return new_task_id()
        return task_id_for(*slot_of(target))

    def _in_slot(self, task_id: str, target: DeploymentSpec | AppSpec) -> bool:
        """Whether a request stored under `task_id` has its keys in `target`'s slot (always, on one Redis)."""
        return not self.cluster or key_slot(_keys.result(task_id)) == key_slot(
            _keys.deployment_slot_key(*slot_of(target))
        )

    async def _claim_alias(self, request_id: str, job_id: str, ttl_s: int) -> None:
        """Let a caller-chosen id lead to the job stored under `job_id` (on a cluster, where the chosen id's
        slot is not its deployment's). Claimed before the enqueue, so a chosen id names one job only: taken
        already, `RequestIdInUseError` (409). With SERVE_REDIS_WAIT_REPLICAS, confirmed by its shard's replicas,
        as the job is, so a failover cannot lose the way to an accepted job."""
        key = _keys.alias(request_id)
        if self.wait_replicas:
            claimed, confirmed = await self._confirmed_write(key, lambda pipe: pipe.set(key, job_id, nx=True, ex=ttl_s))
            if claimed and confirmed < self.wait_replicas:
                await self._drop_alias(request_id)
                raise redis.exceptions.ConnectionError(
                    f"only {confirmed} of the {self.wait_replicas} Redis replicas confirmed request id "
                    f"'{request_id}' within {self.wait_timeout_ms} ms; it was not accepted"
                )
        else:
            claimed = await self.redis.set(key, job_id, nx=True, ex=ttl_s)
        if not claimed:
            raise _id_in_use(request_id)

    async def _drop_alias(self, request_id: str | None, unless_job: str | None = None) -> None:
        """Free a chosen id whose request was not accepted; with `unless_job`, only if that job does not exist
        (best effort: at worst the id stays taken until its TTL)."""
        if request_id is None:
            return
        try:
            if unless_job is not None and await self.redis.exists(_keys.job(unless_job)):
                return
            await self.redis.delete(_keys.alias(request_id))
        except REDIS_FAULTS as exc:
            logger.warning("could not free request id %s of a request that was not accepted: %r", request_id, exc)

    def _batcher_for(self, app: str, deployment: str) -> EnqueueBatcher:
        """On a cluster, submits go together only with submits for the same slot (one script call, one slot)."""
        if not self.cluster:
            return self._batcher
        slot = key_slot(_keys.deployment_slot_key(app, deployment))
        batcher = self._slot_batchers.get(slot)
        if batcher is None:
            batcher = self._slot_batchers[slot] = EnqueueBatcher(self._enqueue)
        return batcher

    async def _enqueue_replicated(
        self, job_id: str, name: str, keys: list[str], args: list[Any], retention: int
    ) -> tuple[int, bytes]:
        """ENQUEUE, then WAIT on the same connection until `wait_replicas` replicas hold the write.

        WAIT counts the replicas that hold its connection's last write, so both go in one pipeline on one
        connection: the client's own on one Redis or Sentinel; on a cluster, a plain client's of the node that
        owns the request's slot (redis-py's cluster client may send WAIT elsewhere, or on another connection).
        A request that was already there (this enqueue retried after a lost answer, or a repeated idempotency
        key) is confirmed too: the script rewrites what it found, so the WAIT covers it."""
        conn = await self._primary_for(keys[0]) if self.cluster else self.redis
        for attempt in (1, 2):
            try:
                async with conn.pipeline(transaction=False) as pipe:
                    pipe.evalsha(self._enqueue.sha, len(keys), *keys, 1, len(keys) - 2, *args)  # a batch of one
                    pipe.wait(self.wait_replicas, self.wait_timeout_ms)
                    enqueued, replicated = await pipe.execute(raise_on_error=False)
            except REDIS_FAULTS:
                if self.cluster:  # the node may be gone (a failover): the next request asks the cluster again
                    await self._forget_nodes()
                raise
            if isinstance(enqueued, redis.exceptions.NoScriptError) and attempt == 1:
                await conn.script_load(_scripts.ENQUEUE)  # a restarted or promoted Redis: load it, retry
                continue
            if isinstance(enqueued, redis.exceptions.MovedError) and self.cluster and attempt == 1:
                await self._forget_nodes()  # the slot moved (a failover, a resharding): to its new owner, once
                conn = self._node_client(enqueued.host, int(enqueued.port))
                continue
            if isinstance(enqueued, Exception):
                raise enqueued
            if isinstance(replicated, Exception):
                raise replicated
            depth, existing = enqueued[0]
            if depth == -3:  # another request's id: refused whatever the replicas hold
                return int(depth), existing
            if depth != -1 and int(replicated) < self.wait_replicas:
                if depth != 0:  # ours (new, or our own retried enqueue): withdrawn; an earlier job is not ours
                    queued = list(zip(keys[2:], args[11:], strict=True))
                    await self._withdraw(job_id, name, int(replicated), retention, queued)
                raise redis.exceptions.ConnectionError(
                    f"only {int(replicated)} of the {self.wait_replicas} Redis replicas SERVE_REDIS_WAIT_REPLICAS "
                    f"asks for confirmed the request within {self.wait_timeout_ms} ms; it was not accepted"
                )
            return int(depth), existing
        raise redis.exceptions.NoScriptError("the enqueue script could not be loaded")

    async def _confirmed_write(self, key: str, write: Callable[[Any], Any]) -> tuple[Any, int]:
        """`write` (one command on `key`, added to a pipeline), then WAIT on the same connection of `key`'s
        primary (see `_enqueue_replicated`): the command's reply and how many replicas confirmed it."""
        conn = await self._primary_for(key)
        async with conn.pipeline(transaction=False) as pipe:
            write(pipe)
            pipe.wait(self.wait_replicas, self.wait_timeout_ms)
            reply, confirmed = await pipe.execute()
        return reply, int(confirmed)

    async def _push_replicated(self, queue: str, message: str) -> None:
        """LPUSH, confirmed by the queue's shard's replicas."""
        _, confirmed = await self._confirmed_write(queue, lambda pipe: pipe.lpush(queue, message))
        if confirmed < self.wait_replicas:
            raise redis.exceptions.ConnectionError(
                f"only {confirmed} of the {self.wait_replicas} Redis replicas confirmed a parallel branch"
            )

    async def _primary_for(self, key: str) -> Any:
        """A plain client of the cluster node that owns `key`'s slot (as the cluster client knows it)."""
        await self.redis.initialize()
        node = self.redis.get_node_from_key(key)  # type: ignore[attr-defined]
        return self._node_client(node.host, int(node.port))

    def _node_client(self, host: str, port: int) -> Any:
        name = f"{host}:{port}"
        client = self._node_clients.get(name)
        if client is None:
            client = self._node_clients[name] = node_client(self.url, host, port)
        return client

    async def _forget_nodes(self) -> None:
        """Have the cluster client read the slots' owners again (best effort: it also does on its own errors)."""
        try:
            await self.redis.nodes_manager.initialize()  # type: ignore[attr-defined]
        except REDIS_FAULTS as exc:
            logger.debug("could not refresh the cluster's slot owners: %r", exc)

    async def _withdraw(
        self, job_id: str, name: str, replicated: int, retention: int, queued: list[tuple[str, str]]
    ) -> None:
        """Take back a request that was not replicated in time: off its queue(s) if no replica took it yet,
        and its job ended as cancelled (a replica skips cancelled work), so the caller's retry is the only copy
        that runs. Best effort: the master may be the very thing failing."""
        error = {
            "exc_type": "ServeError",
            "exc_message": f"request to '{name}' was not accepted: only {replicated} of {self.wait_replicas} "
            "Redis replicas confirmed it in time",
            "exc_module": "celery_serve.exceptions",
        }
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for queue, message in queued:
                    pipe.lrem(queue, 1, message)
                await pipe.execute()
            await self.redis.register_script(_scripts.FINISH)(
                keys=[_keys.job(job_id), _keys.result(job_id)],
                args=[time.time(), _results.failure(job_id, error, 503), retention, "cancelled", 1],
            )
        except redis.exceptions.RedisError as exc:
            logger.warning("could not withdraw unreplicated request %s: %s", job_id, exc)

    async def wait(self, sub: Submitted, dep: str, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The result record; `RequestTimeoutError` at the request's deadline; None when `timeout_s`
        (shorter than the deadline) passed first, while the request goes on."""
        remaining = max(sub.deadline - time.time(), 0.0)
        early = timeout_s is not None and timeout_s < remaining
        try:
            async with asyncio.timeout(timeout_s if early else remaining):
                return await sub.future
        except TimeoutError:
            if early:
                return None
            await self._expire(sub.task_id, dep)
            raise RequestTimeoutError(
                f"no result from deployment '{dep}' within its request timeout (request {sub.request_id})"
            ) from None
        finally:
            self.waiter.discard(sub.task_id)

    async def _expire(self, job_id: str, dep: str) -> None:
        """At the deadline, end the job `expired` if no replica started it, so it never reads `queued` after
        its caller gave up (a replica that takes it later skips it)."""
        record = _results.expired(job_id, dep)
        try:
            await self._finish(
                keys=[_keys.job(job_id), _keys.result(job_id)], args=[time.time(), record, 600, "expired", 1]
            )
        except REDIS_FAULTS as exc:  # a later read of the job expires it lazily (see _wire.jobs)
            logger.debug("could not expire job %s: %r", job_id, exc)

    async def _sweep_lost(self) -> None:
        """Fail the awaited requests whose job Redis lost, every `_LOST_SWEEP_S`, instead of at their deadline.

        The data-loss marker (`keys.EPOCH`) catches a single Redis restarted empty. This catches what it cannot:
        on a cluster, a shard other than the applications' restarted without its data; anywhere, job and queue
        keys evicted (a `maxmemory-policy` that evicts any key) or deleted by hand."""
        while True:
            await asyncio.sleep(_LOST_SWEEP_S)
            waiting = self.waiter.accepted_before(_LOST_SWEEP_S)
            if not waiting:
                continue
            if len(waiting) > _LOST_SWEEP_MAX:  # an overload's backlog: every one is looked at within a few sweeps
                waiting = random.sample(waiting, _LOST_SWEEP_MAX)
            try:
                await self.lost_requests(waiting)
            except REDIS_FAULTS as exc:  # Redis away: the requests' own deadlines and the data-loss check go on
                logger.debug("could not look for lost requests: %r", exc)

    async def lost_requests(self, candidates: list[str] | None = None) -> int:
        """Fail every request this process waits for (or those of `candidates` it still waits for) whose job and
        result Redis no longer has: lost with Redis's data, it will never be answered. Returns how many."""
        pending = self.waiter.pending_ids() if candidates is None else candidates
        if not pending:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for job_id in pending:
            pipe.exists(_keys.job(job_id), _keys.result(job_id))  # one slot: a request's keys share its tag
        found = await pipe.execute()
        waiting = set(self.waiter.pending_ids())  # answered while we looked: not lost
        lost = [job_id for job_id, exists in zip(pending, found, strict=True) if not exists and job_id in waiting]
        for job_id in lost:
            error = ServiceUnavailableError(
                f"request {job_id} was lost: Redis no longer has it (a restart without persistence, a failover to a "
                "replica that had not received it, or its keys evicted or deleted) and it was not answered; it may "
                "or may not have run. Retry it."
            )
            self.waiter.fail(job_id, orjson.loads(_results.failure(job_id, error.to_dict(), http_status=503)))
        if lost:
            logger.error(
                "%d waiting requests were lost: Redis no longer has their jobs (lost data, or keys evicted or "
                "deleted); their callers get 503",
                len(lost),
            )
        return len(lost)

    async def call(
        self,
        dep: DeploymentSpec | AppSpec,
        method: str = "__call__",
        args: list[Any] | tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        sub = await self.submit(dep, method, args, kwargs, **options)
        record = await self.wait(sub, target_name(dep))
        if record is None:  # unreachable without timeout_s; keeps the type checker honest
            raise RequestTimeoutError(f"no result from deployment '{target_name(dep)}' (request {sub.request_id})")
        return record
