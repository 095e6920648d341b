"""`serve.run(app, _local_testing_mode=True)`: the application in the calling process, no Redis, no workers,
with the handle semantics of the distributed mode. Ray's local_dev.py example, import lines changed."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.requests import Request

import celery_serve as serve
from celery_serve.handle import DeploymentHandle, DeploymentResponse

ROOT = Path(__file__).resolve().parent.parent


# __local_dev_start__ (Ray's doc_code/local_dev.py)
@serve.deployment
class Doubler:
    def double(self, s: str):
        return s + " " + s


@serve.deployment
class HelloDeployment:
    def __init__(self, doubler: DeploymentHandle):
        self.doubler = doubler

    async def say_hello_twice(self, name: str):
        return await self.doubler.double.remote(f"Hello, {name}!")

    async def __call__(self, request: Request):
        return await self.say_hello_twice(request.query_params["name"])


app = HelloDeployment.bind(Doubler.bind())
# __local_dev_end__


@pytest.fixture(autouse=True)
def _stop_local() -> Iterator[None]:
    yield
    from celery_serve._runtime.local import shutdown_local

    shutdown_local()


def test_ray_local_dev_example() -> None:
    handle: DeploymentHandle = serve.run(app, _local_testing_mode=True)
    response: DeploymentResponse = handle.say_hello_twice.remote(name="Ray")
    assert response.result() == "Hello, Ray! Hello, Ray!"


def test_responses_are_awaitable_chainable_and_carry_errors() -> None:
    @serve.deployment
    class Adder:
        def __init__(self, inc: int) -> None:
            self.inc = inc

        async def __call__(self, x: int) -> int:
            if x < 0:
                raise ValueError("negative input")
            return x + self.inc

    handle = serve.run(Adder.bind(10), name="adder", _local_testing_mode=True)

    async def main() -> int:
        return await handle.remote(handle.remote(1))  # a response passed as an argument is awaited first

    assert asyncio.run(main()) == 21
    with pytest.raises(ValueError, match="negative input"):
        handle.remote(-1).result()
    with pytest.raises(serve.RequestTimeoutError):
        serve.run(_Sleeper.bind(), name="sleeper", _local_testing_mode=True).remote(1.0).result(timeout_s=0.05)
    with pytest.raises(serve.DeploymentNotFoundError, match="no method 'missing'"):
        handle.missing.remote().result()


@serve.deployment
class _Sleeper:
    async def __call__(self, s: float) -> float:
        await asyncio.sleep(s)
        return s


def test_batching_and_user_config_work_locally() -> None:
    @serve.deployment(user_config={"max_batch_size": 3})
    class Tokens:
        def __init__(self) -> None:
            self.sizes: list[int] = []

        @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.2)
        async def process(self, sequences: list[str]) -> list[int]:
            self.sizes.append(len(sequences))
            return [len(s.split()) for s in sequences]

        async def __call__(self, sequence: str) -> int:
            return await self.process(sequence)

        def reconfigure(self, config: dict) -> None:
            self.process.set_max_batch_size(config["max_batch_size"])

        def sizes_seen(self) -> list[int]:
            return self.sizes

    handle = serve.run(Tokens.bind(), name="tokens", _local_testing_mode=True)
    responses = [handle.remote(s) for s in ["a", "b c", "d e f", "g h i j", "k"]]
    assert [r.result() for r in responses] == [1, 2, 3, 4, 1]
    assert handle.sizes_seen.remote().result() == [3, 2]


def test_sync_methods_run_concurrently_up_to_max_ongoing_requests() -> None:
    @serve.deployment(max_ongoing_requests=2)
    class Sync:
        def __init__(self) -> None:
            self.now = 0
            self.most = 0
            self.lock = threading.Lock()

        def __call__(self) -> int:
            with self.lock:
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(0.1)
            with self.lock:
                self.now -= 1
            return self.most

        def most_at_once(self) -> int:
            return self.most

    handle = serve.run(Sync.bind(), name="sync", _local_testing_mode=True)
    for r in [handle.remote() for _ in range(6)]:
        r.result()
    assert handle.most_at_once.remote().result() == 2


def test_local_mode_needs_no_redis_and_starts_no_process() -> None:
    """In a fresh interpreter without REDIS_URL: nothing is started, no redis-server anywhere in its tree."""
    code = textwrap.dedent(
        """
        import psutil
        import celery_serve as serve

        @serve.deployment
        def hello(name: str) -> str:
            return f"hello {name}"

        handle = serve.run(hello.bind(), _local_testing_mode=True)
        assert handle.remote("you").result() == "hello you"
        assert psutil.Process().children(recursive=True) == []
        serve.shutdown()
        print("ok")
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_a_local_handle_refuses_to_travel() -> None:
    import pickle

    handle = serve.run(app, name="travel", _local_testing_mode=True)
    with pytest.raises(serve.DeploymentConfigError, match="cannot leave its process"):
        pickle.dumps(handle)


@serve.deployment
class Tokens:
    def count(self, n: int):
        yield from range(n)

    async def words(self, text: str):
        for word in text.split():
            await asyncio.sleep(0)
            yield word

    def plain(self) -> int:
        return 1

    def which_model(self) -> str:
        return serve.get_multiplexed_model_id()


def test_streams_and_model_ids_work_locally_as_they_do_distributed() -> None:
    handle = serve.run(Tokens.bind(), name="tokens", _local_testing_mode=True)
    assert list(handle.options(stream=True).count.remote(4)) == [0, 1, 2, 3]

    async def collect() -> list[str]:
        return [w async for w in handle.options(stream=True).words.remote("a b c")]

    assert asyncio.run(collect()) == ["a", "b", "c"]
    with pytest.raises(serve.StreamUsageError, match=r"options\(stream=True\)"):
        handle.count.remote(2).result()
    with pytest.raises(serve.StreamUsageError, match="not a generator"):
        list(handle.options(stream=True).plain.remote())
    assert handle.options(multiplexed_model_id="m7").which_model.remote().result() == "m7"
    assert handle.which_model.remote().result() == ""
