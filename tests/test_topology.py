"""The separate-process topology docker-compose runs: Redis, `deploy`, `gateway` and `worker` as their own
processes, configured only by the Redis URL."""

from __future__ import annotations

import signal

import httpx
import pytest
import redis

from celery_serve._runtime.launcher import ProcessGroup, free_port, start_embedded_redis
from celery_serve._wire import keys as _keys
from tests.conftest import wait_until
from tests.test_examples import CliProcess, env_without_redis, gone


@pytest.fixture
def own_redis() -> str:
    group = ProcessGroup()
    try:
        yield start_embedded_redis(group)
    finally:
        group.stop()


def test_deploy_gateway_and_worker_as_separate_processes(own_redis: str) -> None:
    env = env_without_redis()
    deploy = CliProcess.start("deploy", "examples.hello:app", "--redis-url", own_redis, env=env)
    assert deploy.proc.wait(timeout=60) == 0, deploy.output
    wait_until(lambda: "deployed 'default' (hello) at /" in deploy.output, timeout_s=10)
    assert redis.Redis.from_url(own_redis).hexists(_keys.APPS, "default")

    port = free_port()
    gateway = CliProcess.start("gateway", "--port", str(port), "--redis-url", own_redis, env=env)
    worker = CliProcess.start("worker", "--deployment", "hello", "--redis-url", own_redis, env=env)
    processes = [gateway, worker]
    try:

        def answered() -> str | None:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/", params={"name": "Ada"}, timeout=30)
            except httpx.HTTPError:
                return None
            return response.text if response.status_code == 200 else None

        assert wait_until(answered, timeout_s=150, interval_s=0.1, what="the gateway to answer") == "Hello Ada!"
        assert httpx.get(f"http://127.0.0.1:{port}/-/routes").json() == {"/": "hello"}

        replicas = worker.descendants()
        assert any("celery_serve.workers.replica_main" in " ".join(p.cmdline()) for p in replicas)
        for cli in processes:
            cli.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(timeout=90) == 0, worker.output
        # uvicorn shuts down gracefully, then re-raises the signal it caught (so the exit is "by SIGTERM").
        assert gateway.proc.wait(timeout=90) in (0, -signal.SIGTERM), gateway.output
        wait_until(lambda: gone(replicas), timeout_s=30, what="the worker's replicas to exit")
    finally:
        for cli in processes:
            if cli.proc.poll() is None:
                cli.kill_everything()


def test_worker_for_an_unknown_deployment_fails_with_a_clear_message(own_redis: str) -> None:
    env = env_without_redis()
    deploy = CliProcess.start("deploy", "examples.hello:app", "--redis-url", own_redis, env=env)
    assert deploy.proc.wait(timeout=60) == 0, deploy.output
    worker = CliProcess.start("worker", "--deployment", "nope", "--redis-url", own_redis, env=env)
    try:
        assert worker.proc.wait(timeout=60) == 2
        wait_until(lambda: "has no deployment 'nope' (it has: hello)" in worker.output, timeout_s=10)
    finally:
        if worker.proc.poll() is None:
            worker.kill_everything()


def test_commands_that_need_redis_say_so() -> None:
    cli = CliProcess.start("gateway", env=env_without_redis())
    assert cli.proc.wait(timeout=60) == 2
    wait_until(lambda: "needs a Redis" in cli.output, timeout_s=10)
