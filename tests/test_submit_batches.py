"""Submits that arrive together reach Redis in one ENQUEUE call (`_wire.submit_batches`), each caller with its
own outcome, on a real Redis through the transport."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis

from celery_serve import BackpressureError, deployment
from celery_serve._runtime.spec import DeploymentSpec, build_spec
from celery_serve._wire import keys as _keys
from celery_serve._wire.envelope import parse_message
from celery_serve._wire.transport import QueueTransport
from celery_serve.exceptions import RequestIdInUseError


@deployment
class Batched:
    """Only its spec is used: requests are queued, never served."""


def _spec(max_queued_requests: int = -1) -> DeploymentSpec:
    app = f"batches-{uuid.uuid4().hex[:8]}"
    return build_spec(Batched.options(max_queued_requests=max_queued_requests).bind(), app, None).deployments["Batched"]


async def _submit_together(transport: QueueTransport, spec: DeploymentSpec, count: int, **kw: Any) -> list[Any]:
    async def one(i: int) -> Any:
        try:
            return (await transport.submit(spec, "m", [i], expect_reply=False, **kw)).task_id
        except BackpressureError as exc:
            return exc

    return await asyncio.gather(*(one(i) for i in range(count)))


def _counting(transport: QueueTransport) -> list[int]:
    sizes: list[int] = []
    send = transport._batcher._send

    async def counted(submits: list[Any]) -> Any:
        sizes.append(len(submits))
        return await send(submits)

    transport._batcher._send = counted  # type: ignore[method-assign]
    return sizes


def test_submits_that_come_together_share_calls_and_each_is_queued_once(
    redis_url: str, redis_client: redis.Redis
) -> None:
    spec = _spec()

    async def main() -> tuple[list[Any], list[int]]:
        transport = QueueTransport(redis_url)
        await transport.start()
        sizes = _counting(transport)
        try:
            return await _submit_together(transport, spec, 40), sizes
        finally:
            await transport.close()

    ids, sizes = asyncio.run(main())
    try:
        assert len(set(ids)) == 40 and sum(sizes) == 40
        assert sizes[0] == 1 and len(sizes) <= 3  # the first alone, at once; the others in one or two calls
        queued = sorted(parse_message(m).args[0] for m in redis_client.lrange(spec.queue, 0, -1))
        assert queued == list(range(40))
        assert {redis_client.hget(_keys.job(i), "status") for i in ids} == {b"queued"}
    finally:
        redis_client.delete(spec.queue, *(_keys.job(i) for i in ids))


def test_each_submit_in_a_call_gets_its_own_outcome(redis_url: str, redis_client: redis.Redis) -> None:
    """A queue limit of 5 and 12 submits at once: exactly 5 accepted, 7 refused, in one or two calls."""
    spec = _spec(max_queued_requests=5)

    async def main() -> list[Any]:
        transport = QueueTransport(redis_url)
        await transport.start()
        try:
            return await _submit_together(transport, spec, 12)
        finally:
            await transport.close()

    outcomes = asyncio.run(main())
    try:
        refused = [o for o in outcomes if isinstance(o, BackpressureError)]
        assert len(refused) == 7 and redis_client.llen(spec.queue) == 5
        assert "already has 5 requests waiting" in str(refused[0])
    finally:
        redis_client.delete(spec.queue)


def test_a_failed_call_fails_every_submit_in_it_and_the_next_submit_goes_through(
    redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _spec()

    async def main() -> tuple[list[Any], str]:
        transport = QueueTransport(redis_url)
        await transport.start()
        send = transport._batcher._send
        calls = 0

        async def failing(submits: list[Any]) -> Any:
            nonlocal calls
            calls += 1
            if calls <= 2:  # the first call (one submit) and the batch that waited for it
                await asyncio.sleep(0.01)
                raise redis.exceptions.ConnectionError("Redis went away")
            return await send(submits)

        transport._batcher._send = failing  # type: ignore[method-assign]
        try:
            results = await asyncio.gather(
                *(transport.submit(spec, "m", [i], expect_reply=False) for i in range(10)), return_exceptions=True
            )
            after = await transport.submit(spec, "m", ["after"], expect_reply=False)
            return list(results), after.task_id
        finally:
            await transport.close()

    results, after = asyncio.run(main())
    try:
        assert all(isinstance(r, redis.exceptions.ConnectionError) for r in results), results
        assert [parse_message(m).args for m in redis_client.lrange(spec.queue, 0, -1)] == [["after"]]
        assert redis_client.hget(_keys.job(after), "status") == b"queued"
    finally:
        redis_client.delete(spec.queue, _keys.job(after))


def test_one_chosen_request_id_sent_twice_at_once_is_one_job_and_one_refusal(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """Two requests that choose the same id (X-Request-ID) at the same moment both find it free before either is
    queued. The enqueue must tell the second from its own call resent after a lost answer (which is queued once
    and answered): the second is refused (409), never taken for the first, whose answer it would then read or
    steal. Through two gateways (two transports), one gateway's sync requests, and one gateway's jobs (which go
    in one ENQUEUE call)."""
    spec = _spec()

    async def main() -> list[list[Any]]:
        first, second = QueueTransport(redis_url), QueueTransport(redis_url)
        await first.start()
        await second.start()
        try:
            rounds = []
            for name, transports, reply in (
                ("gateways", (first, second), False),
                ("sync", (first, first), True),
                ("jobs", (first, first), False),
            ):
                chosen = f"chosen-{name}-{uuid.uuid4().hex[:8]}"
                outcomes = await asyncio.gather(
                    *(
                        t.submit(spec, "m", [i], task_id=chosen, expect_reply=reply, job=not reply)
                        for i, t in enumerate(transports)
                    ),
                    return_exceptions=True,
                )
                rounds.append([chosen, *outcomes])
            return rounds
        finally:
            await first.close()
            await second.close()

    rounds = asyncio.run(main())
    try:
        queued = [parse_message(m) for m in redis_client.lrange(spec.queue, 0, -1)]
        for chosen, *outcomes in rounds:
            kinds = sorted(type(o).__name__ for o in outcomes)
            assert kinds == ["RequestIdInUseError", "Submitted"], (chosen, outcomes)
            refused = next(o for o in outcomes if isinstance(o, RequestIdInUseError))
            assert f"request id '{chosen}' already names a job" in str(refused)
            accepted = outcomes.index(next(o for o in outcomes if not isinstance(o, Exception)))
            mine = [m for m in queued if m.task_id == chosen]
            assert [m.args for m in mine] == [[accepted]], (chosen, mine)  # queued once, with its own argument
    finally:
        redis_client.delete(spec.queue)
