"""`max_ongoing_requests` caps what one replica runs at once, for sync methods (run in threads, as in Ray) and
async ones alike; Ray's load-shedding example behaves as its documentation says."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.conftest import Served
from tests.served_apps import served_apps


@pytest.fixture(scope="module")
def limits(served: Served) -> Iterator[dict[str, Any]]:
    from tests import ray_load_shedding as ex

    apps = {"shed": ex.shedding_app, "sync-peak": ex.sync_peak_app, "async-peak": ex.async_peak_app}
    with served_apps(served, {name: (app, f"/{name}") for name, app in apps.items()}) as handles:
        yield handles


@pytest.mark.parametrize("name", ["sync-peak", "async-peak"])
def test_a_replica_runs_up_to_max_ongoing_requests_at_once_and_no_more(limits: dict[str, Any], name: str) -> None:
    handle = limits[name]
    responses = [handle.work.remote(0.3) for _ in range(9)]
    assert sum(r.result(timeout_s=60) for r in responses) == 9
    assert handle.most.remote().result(timeout_s=30) == 3  # three at once (sync ones in threads), never four


def test_ray_load_shedding_example(limits: dict[str, Any], served: Served) -> None:
    """Two run, two wait in the queue, the next five are refused at once with 503; the first four succeed."""

    async def main() -> None:
        async with httpx.AsyncClient(base_url=served.gateway_url, timeout=30) as client:

            async def do_request() -> int:
                return (await client.get("/shed")).status_code

            first = [asyncio.create_task(do_request()) for _ in range(2)]
            done, pending = await asyncio.wait(first, timeout=1)
            assert len(pending) == 2  # the replica runs them (2 s each)
            queued = [asyncio.create_task(do_request()) for _ in range(2)]
            done, pending = await asyncio.wait(queued, timeout=0.1)
            assert len(pending) == 2  # they wait in the queue
            for status_code in await asyncio.gather(*(do_request() for _ in range(5))):
                assert status_code == 503  # replica and queue are full: refused at once
            assert [await t for t in first + queued] == [200] * 4

    asyncio.run(main())


def test_fast_sync_methods_run_inline_and_slow_ones_in_threads() -> None:
    """A thread hop costs more than a call measured well under a millisecond: such a method runs inline;
    one measured slower goes to the replica's threads. Pure unit: the replica without Redis."""
    from celery_serve._runtime.spec import build_spec
    from celery_serve._wire.envelope import build_message, parse_message
    from celery_serve.workers.replica import Replica
    from tests import ray_load_shedding as ex

    spec = build_spec(ex.speeds_app, "speeds", "/speeds")
    replica = Replica(spec, "Speeds")

    def env(method: str) -> Any:
        return parse_message(build_message(task_id="t", app="speeds", deployment="Speeds", method=method))

    async def main() -> None:
        for method, value in (("quick", 1), ("slow", 2)):
            assert replica.runs_concurrently(env(method))  # not measured yet: a thread, to be safe
            for _ in range(5):
                assert (await replica.run(env(method))).value == value

    asyncio.run(main())
    assert not replica.runs_concurrently(env("quick"))
    assert replica.runs_concurrently(env("slow"))
