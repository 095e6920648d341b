"""Shared fixtures: one real Redis and one gateway per test session, and a `wait_until` helper.

Integration tests use real parts: a redis-server started here, Celery worker processes started by
`app.run`, HTTP through uvicorn. Starting an application costs seconds (Celery worker start-up), so the
test applications of `tests/deployments.py` are started once, together, by the `served` fixture.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis

from celery_serve import DeploymentHandle
from celery_serve._runtime.launcher import ProcessGroup, free_port, gateway_command, redis_env, start_embedded_redis

T = TypeVar("T")

STARTUP_TIMEOUT_S = 150.0


def thread_count(pid: int) -> int:
    """How many threads the process has now (from /proc), to show a server's threads stay bounded."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError(f"no Threads: line for pid {pid}")


def wait_until(predicate: Callable[[], T], timeout_s: float = 30.0, interval_s: float = 0.02, what: str = "") -> T:
    """Poll `predicate` until it returns something truthy; return that, or fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or predicate}")
        time.sleep(interval_s)


def start_gateway(group: ProcessGroup, redis_url: str, env: dict[str, str] | None = None) -> str:
    """Start a gateway process (`python -m celery_serve gateway`) of its own; returns its URL once it answers."""
    port = free_port()
    group.start("gateway", gateway_command("127.0.0.1", port), env=redis_env(redis_url, env))
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{url}/-/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, timeout_s=60, interval_s=0.05, what=f"the gateway at {url}")
    return url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server of this session, on a free loopback port."""
    group = ProcessGroup()
    url = start_embedded_redis(group)
    yield url
    group.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@dataclass
class Served:
    """The session's running applications."""

    redis_url: str
    gateway_url: str
    gateway_pid: int
    handles: dict[str, DeploymentHandle]

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.gateway_url, timeout=kwargs.pop("timeout", 60.0), **kwargs)


def _test_applications() -> dict[str, tuple[Any, str]]:
    """Application name -> (application, route prefix). No test application is served at '/'."""
    import examples.composition
    from tests import deployments, safety_deployments

    return {
        "probe": (deployments.probe_app, "/probe"),
        "compose": (examples.composition.app, "/compose"),
        "fn": (deployments.summarize_app, "/fn"),
        "clf": (deployments.classifier_app, "/clf"),
        "busy": (deployments.busy_app, "/busy"),
        "deadline": (deployments.deadline_app, "/deadline"),
        "load": (deployments.load_app, "/load"),
        "strict": (safety_deployments.echo_app, "/strict"),
        "strict_api": (safety_deployments.ingress_app, "/strict-api"),
    }


@pytest.fixture(scope="session")
def served(redis_url: str) -> Iterator[Served]:
    """Every test application, running behind one gateway (started together: start-up is the slow part)."""
    from celery_serve import run
    from celery_serve._runtime import serve as _serve

    os.environ.setdefault("SERVE_LOG_LEVEL", "WARNING")
    port = free_port()
    apps = _test_applications()
    try:
        with ThreadPoolExecutor(len(apps)) as pool:
            futures = {
                name: pool.submit(
                    run,
                    application,
                    name=name,
                    route_prefix=prefix,
                    port=port,
                    redis_url=redis_url,
                    startup_timeout_s=STARTUP_TIMEOUT_S,
                )
                for name, (application, prefix) in apps.items()
            }
            handles = {name: future.result() for name, future in futures.items()}
        session = _serve._session
        assert session is not None and session.gateway_url is not None
        gateway = next(p for p in session.group.processes if p.name == "gateway")
        yield Served(session.redis_url, session.gateway_url, gateway.proc.pid, handles)
    finally:
        _stop_workers_together()
        _serve.shutdown()


def _stop_workers_together() -> None:
    """SIGTERM every worker at once (shutdown() stops them one by one, which adds up with many)."""
    from celery_serve._runtime import serve as _serve

    session = _serve._session
    if session is None:
        return
    workers = [p for p in session.group.processes if p.name.startswith("worker ")]
    for worker in workers:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGTERM)
    for worker in workers:
        worker.stop()  # waits for it (and kills it only if it does not stop within the grace period)
