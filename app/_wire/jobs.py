"""Jobs: every request's record in Redis, read, long-polled and cancelled from any gateway or client.

A job is the hash the enqueue script writes (`serve:job:<id>`) plus, once it ends, its Celery-format
result record. Everything lives in Redis, so a job outlives the gateway that accepted it. Waiting for a
job subscribes to its result key's channel (the completing script publishes there): no polling.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import time
import uuid
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from celery_serve._wire import keys as _keys
from celery_serve._wire import results as _results
from celery_serve._wire import scripts as _scripts
from celery_serve._wire.connections import BLOCK_S
from celery_serve.exceptions import BadRequestError, DeploymentNotFoundError

logger = logging.getLogger(__name__)

TERMINAL = frozenset({"succeeded", "failed", "cancelled", "expired"})


# A client may choose its request's id (X-Request-ID): a UUID, or 1-128 letters, digits, '.', '_', '-' that
# start with a letter or digit (so never '-', the route-jobs marker, and nothing that could split a key or a path).
_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_job_id(job_id: str) -> str:
    """A job id as stored: UUIDs in their canonical form, client-chosen ids as they are."""
    try:
        return str(uuid.UUID(job_id))
    except (ValueError, AttributeError, TypeError):
        pass
    if isinstance(job_id, str) and _CLIENT_ID.fullmatch(job_id):
        return job_id
    raise BadRequestError(
        f"'{job_id[:64] if isinstance(job_id, str) else job_id}' is not a job id: job ids are UUIDs, or 1-128 "
        "letters, digits, '.', '_' and '-' starting with a letter or digit"
    )


def client_request_id(value: bytes | str) -> str:
    """The job id a client asked for in `X-Request-ID`; `BadRequestError` saying what is allowed otherwise."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    return check_job_id(text.strip())


def _text(value: bytes | None) -> str | None:
    return value.decode() if value is not None else None


def _number(value: bytes | None) -> float | None:
    return float(value) if value not in (None, b"") else None


def result_value(result: Any) -> Any:
    """A stored result as a caller sees it: an HTTP response becomes its body (JSON decoded when JSON)."""
    if isinstance(result, dict) and {"status_code", "headers", "body", "body_encoding"} <= result.keys():
        body = result["body"]
        if result["body_encoding"] == "base64":
            return base64.b64decode(body).decode("latin-1")
        content_type = next((v for k, v in result["headers"] if k.lower() == "content-type"), "")
        if content_type.startswith("application/json"):
            try:
                return json.loads(body)
            except ValueError:
                return body
        return body
    return result


def _status_of(record: dict[str, Any] | None) -> str:
    """The terminal state a result record stands for (when the job hash itself is gone)."""
    if record is None or record["status"] == _results.FAILURE:
        return "failed"
    if record["status"] == _results.SUCCESS:
        return "succeeded"
    return "cancelled" if (record.get("result") or {}).get("exc_type") == "JobCancelledError" else "expired"


def describe(job_id: str, fields: dict[bytes, bytes], record: dict[str, Any] | None) -> dict[str, Any]:
    """The JSON a job reads as over HTTP and in the client."""
    status = _text(fields.get(b"status")) or _status_of(record)
    job: dict[str, Any] = {
        "job_id": job_id,
        "status": status,
        "application": _text(fields.get(b"app")),
        "deployment": _text(fields.get(b"deployment")),
        "method": _text(fields.get(b"method")),
        "created_at": _number(fields.get(b"created_at")),
        "started_at": _number(fields.get(b"started_at")),
        "finished_at": _number(fields.get(b"finished_at")),
        "deadline": _number(fields.get(b"deadline")),
    }
    if fields.get(b"stream"):  # a streamed response: its chunks are replayed from here
        job["stream_url"] = f"/jobs/{job_id}/stream"
    if record is not None and status in TERMINAL:
        if record["status"] == _results.SUCCESS:
            job["result"] = result_value(record["result"])
            if isinstance(record["result"], dict) and "status_code" in record["result"]:
                job["status_code"] = record["result"]["status_code"]
        else:
            error = record.get("result") or {}
            job["error"] = {"type": error.get("exc_type", "Exception"), "message": error.get("exc_message", "")}
    return job


def expiry_grace_s() -> float:
    """How long past its deadline a running job may go before a read ends it `expired` (SERVE_EXPIRY_GRACE_S)."""
    try:
        return max(float(os.environ.get("SERVE_EXPIRY_GRACE_S") or 30.0), 0.0)
    except ValueError:
        return 30.0


class JobStore:
    """Job reads, cancels and long-polls on one Redis client (one pub/sub connection for all waits)."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.redis = client
        self._cluster = isinstance(client, aioredis.RedisCluster)
        self._finish = client.register_script(_scripts.FINISH)
        self._waiting: dict[str, list[asyncio.Future[None]]] = {}
        self._pubsub: Any = None
        self._reader: asyncio.Task[None] | None = None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.wait([self._reader], timeout=1.0)
        if self._pubsub is not None:
            await self._pubsub.aclose()

    async def resolve(self, request_id: str) -> str:
        """The id a job is stored under: on a cluster a caller-chosen id may lead to another (`keys.alias`)."""
        request_id = check_job_id(request_id)
        if not self._cluster:
            return request_id
        stored = await self.redis.get(_keys.alias(request_id))
        return (stored.decode() if isinstance(stored, bytes) else str(stored)) if stored else request_id

    async def get(self, job_id: str) -> dict[str, Any]:
        public = check_job_id(job_id)
        return await self._get(public, await self.resolve(public))

    async def _get(self, public: str, job_id: str) -> dict[str, Any]:
        """The job stored under `job_id`, described under the id its caller knows it by (`public`)."""
        fields, raw = await self._read(job_id)
        if not fields and raw is None:
            raise DeploymentNotFoundError(
                f"no job {public}: it never existed, it finished longer ago than its retention period, or Redis "
                "lost its data (a restart without persistence) before it finished"
            )
        status = _text(fields.get(b"status"))
        deadline = _number(fields.get(b"deadline"))
        now = time.time()
        if deadline is not None and (
            (status == "queued" and now > deadline) or (status == "running" and now > deadline + expiry_grace_s())
        ):
            # Nobody will end it any more (no replica took it in time, or its replica stalled past the
            # deadline): it must not read queued or running forever.
            await self.finish(job_id, "expired", only_if_queued=status == "queued", fields=fields)
            fields, raw = await self._read(job_id)
        return describe(public, fields, _results.decode(raw) if raw is not None else None)

    async def _read(self, job_id: str) -> tuple[dict[bytes, bytes], bytes | None]:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(_keys.job(job_id))
        pipe.get(_keys.result(job_id))
        fields, raw = await pipe.execute()
        return fields, raw

    async def finish(
        self, job_id: str, status: str, *, only_if_queued: bool = False, fields: dict[bytes, bytes] | None = None
    ) -> str:
        """End an unfinished job as cancelled or expired; returns its status before the call."""
        if fields is None:
            fields = dict(await self.redis.hgetall(_keys.job(job_id)))  # type: ignore[arg-type]
        if status == "cancelled":
            record = _results.cancelled(job_id)
        else:
            started = _text(fields.get(b"status")) == "running"
            record = _results.expired(job_id, _text(fields.get(b"deployment")) or "", started=started)
        retention = int(_number(fields.get(b"retention_s")) or 86400)
        before = await self._finish(
            keys=[_keys.job(job_id), _keys.result(job_id)],
            args=[time.time(), record, retention, status, 1 if only_if_queued else 0],
        )
        return before.decode() if isinstance(before, bytes) else str(before)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: unstarted work never runs; running async work is asked to stop."""
        public = check_job_id(job_id)
        job_id = await self.resolve(public)
        before = await self.finish(job_id, "cancelled")
        if before == "missing":
            raise DeploymentNotFoundError(f"no job {public} to cancel (unknown, or past its retention period)")
        job = await self._get(public, job_id)
        job["was"] = before
        return job

    async def wait(self, job_id: str, timeout_s: float) -> dict[str, Any]:
        """The job once it reaches a terminal state, or as it is after `timeout_s`.

        A job still queued at its deadline is read again then (nothing is published when a job
        expires in the queue), so it reads `expired` at its deadline, not when `timeout_s` ends.
        """
        public = check_job_id(job_id)
        job_id = await self.resolve(public)
        job = await self._get(public, job_id)
        if job["status"] in TERMINAL or timeout_s <= 0:  # most fetches: nothing to subscribe to
            return job
        until = time.monotonic() + timeout_s
        channel = _keys.result(job_id)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._subscribe(channel, fut)
        try:
            job = await self._get(public, job_id)  # again once subscribed: a result published meanwhile is seen
            while job["status"] not in TERMINAL and (remaining := until - time.monotonic()) > 0:
                if fut.done():  # the result was published after the read above: read it
                    return await self._get(public, job_id)
                if job["status"] == "queued" and job["deadline"] is not None:
                    remaining = min(remaining, max(job["deadline"] - time.time(), 0.0) + 0.05)
                await asyncio.wait([fut], timeout=remaining)
                job = await self._get(public, job_id)
            return job
        finally:
            await self._unsubscribe(channel, fut)

    async def _subscribe(self, channel: str, fut: asyncio.Future[None]) -> None:
        if self._pubsub is None:
            self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe("serve:jobs:keepalive")
            self._reader = asyncio.create_task(self._read_messages(), name="job-waits")
        first = channel not in self._waiting
        self._waiting.setdefault(channel, []).append(fut)
        if first:
            await self._pubsub.subscribe(channel)

    async def _unsubscribe(self, channel: str, fut: asyncio.Future[None]) -> None:
        waiters = self._waiting.get(channel, [])
        if fut in waiters:
            waiters.remove(fut)
        if not waiters and channel in self._waiting:
            del self._waiting[channel]
            await self._pubsub.unsubscribe(channel)

    async def _read_messages(self) -> None:
        while True:
            try:
                message = await self._pubsub.get_message(timeout=BLOCK_S)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                logger.warning("job long-poll listener lost Redis (%s); retrying", exc)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            for fut in self._waiting.get(message["channel"].decode(), []):
                if not fut.done():
                    fut.set_result(None)
