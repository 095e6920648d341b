"""Deployments for the composition tests: pipelines (Celery chains) and handle graphs.

Module level, so worker processes import them by module path. Executions are counted in the Redis the
replicas serve from, under `serve-test:` keys, so tests can see what ran and what never did.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from celery_serve import DeploymentHandle, batch, deployment, parallel
from tests.deployments import record_execution


def _text(value: Any) -> str:
    return str(value.query_params.get("text", "")) if hasattr(value, "query_params") else str(value)


@deployment
def upper(value: Any) -> str:
    record_execution("pipe-upper")
    text = _text(value)
    if text == "fail":
        raise ValueError("refusing to shout 'fail'")
    return text.upper()


@deployment
class Exclaim:
    @batch(max_batch_size=8, batch_wait_timeout_s=0)
    def __call__(self, texts: list[str]) -> list[str]:
        record_execution("pipe-exclaim")
        return [t + "!" for t in texts]


@deployment
def wrap(text: str) -> dict[str, Any]:
    record_execution("pipe-wrap")
    return {"result": text, "length": len(text)}


@deployment
def slow_first(value: Any) -> str:
    time.sleep(float(_text(value) or 1.0))
    return "slow"


@deployment
def never_late(text: str) -> str:
    record_execution("pipe-late")
    return text


@deployment
def length(text: str) -> int:
    return len(text)


@deployment
def reverse(text: str) -> str:
    return text[::-1]


@deployment
def combine(parts: list[Any]) -> dict[str, Any]:
    return {"parts": parts}


chain_app = upper.bind() >> Exclaim.bind() >> wrap.bind()
late_app = slow_first.options(request_timeout_s=1.0).bind() >> never_late.bind()
fan_app = upper.bind() >> parallel(length.bind(), reverse.bind()) >> combine.bind()
fan_first_app = parallel(length.bind(), reverse.bind()) >> combine.bind()


# --- imperative composition: a graph of handle calls, one replica each --------------------------------


@deployment(num_replicas=1)
class Leaf:
    async def __call__(self, x: int) -> int:
        await asyncio.sleep(0.01)
        return x + 1


@deployment(num_replicas=1)
class Middle:
    def __init__(self, leaf: DeploymentHandle) -> None:
        self.leaf = leaf

    async def __call__(self, x: int) -> int:
        return await self.leaf.remote(x) * 2


@deployment(num_replicas=1)
class Top:
    def __init__(self, middle: DeploymentHandle, leaf: DeploymentHandle) -> None:
        self.middle, self.leaf = middle, leaf

    async def __call__(self, x: int) -> int:
        a, b = await asyncio.gather(self.middle.remote(x), self.leaf.remote(x))
        return a + b

    async def slow(self, seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "slow done"

    def ping(self) -> str:
        return "pong"


@deployment(num_replicas=1)
class Root:
    def __init__(self, top: DeploymentHandle) -> None:
        self.top = top

    async def __call__(self, x: int) -> int:
        return await self.top.remote(x)


leaf = Leaf.bind()
graph_app = Root.bind(Top.bind(Middle.bind(leaf), leaf))
