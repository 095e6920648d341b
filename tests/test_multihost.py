"""celery-serve across hosts: Redis on one, two gateways and two worker hosts, the client and `status` from
another, each host a network namespace with its own address, using only the documented commands and
`--redis-url`. Requests through either gateway are served by replicas on both worker hosts.
"""

from __future__ import annotations

import collections
import os
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from celery_serve._runtime.launcher import redis_server_binary
from tests.conftest import wait_until
from tests.hosts import Network, hosts_available
from tests.test_examples import cli_command

pytestmark = pytest.mark.timeout(300)

SERVICE = textwrap.dedent(
    """
    import os

    import celery_serve as serve


    @serve.deployment(num_replicas=2)
    class Where:
        def __call__(self, request) -> dict:
            return {"host": os.environ["HOST_TAG"], "pid": os.getpid()}


    app = Where.bind()
    """
)


@pytest.fixture
def network() -> Iterator[Network]:
    reason = hosts_available()
    if reason:
        pytest.skip(f"no network namespaces here: {reason}")
    net = Network()
    try:
        yield net
    finally:
        net.close()


def test_requests_are_served_across_hosts(network: Network, tmp_path: Path) -> None:
    (tmp_path / "svc.py").write_text(SERVICE)
    redis_host, worker_b, worker_c = network.add_host("r"), network.add_host("b"), network.add_host("c")
    url = f"redis://{redis_host.address}:6379/0"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(PYTHONPATH=str(tmp_path), SERVE_LOG_LEVEL="WARNING", SERVE_STATE_DIR=str(tmp_path / "runs"))

    redis_cmd = [
        redis_server_binary(),
        "--bind",
        redis_host.address,
        "--port",
        "6379",
        "--save",
        "",
        "--dir",
        str(tmp_path),
        "--protected-mode",  # a passwordless Redis on a non-loopback address (7.x refuses those clients otherwise)
        "no",
    ]
    redis_host.start("redis", redis_cmd)
    wait_until(lambda: _pings(url), 30, what="Redis on its host")
    deployed = redis_host.run(
        ["sh", "-c", f'cd {tmp_path} && exec "$@"', "-", *cli_command("deploy", "svc:app", "--redis-url", url)], env=env
    )
    assert deployed.returncode == 0, deployed.stderr
    redis_host.start(
        "gateway", cli_command("gateway", "--host", "0.0.0.0", "--port", "8000", "--redis-url", url), env=env
    )
    worker_c.start(
        "gateway", cli_command("gateway", "--host", "0.0.0.0", "--port", "8000", "--redis-url", url), env=env
    )
    for host in (worker_b, worker_c):
        host.start(
            "worker",
            cli_command("worker", "-d", "Where", "--replicas", "1", "--redis-url", url),
            env={**env, "HOST_TAG": host.name},
        )

    gateways = [f"http://{redis_host.address}:8000", f"http://{worker_c.address}:8000"]
    served: collections.Counter[tuple[str, str]] = collections.Counter()

    def both_hosts_serve() -> bool:
        for gateway in gateways:
            for _ in range(10):
                try:
                    answer = httpx.get(f"{gateway}/", timeout=10)
                except httpx.HTTPError:
                    return False
                if answer.status_code == 200:
                    served[(gateway, answer.json()["host"])] += 1
        return {host for _, host in served} == {"b", "c"}

    wait_until(both_hosts_serve, 120, interval_s=0.2, what="replicas on both worker hosts to answer")
    assert {gateway for gateway, _ in served} == set(gateways)  # both gateways route to the shared queue

    # the Python client straight onto Redis, and `status`, from a host that runs neither
    client = worker_b.run(
        [sys.executable, "-c", f"from celery_serve import Client; print(Client(redis_url={url!r}).call('Where', 'x'))"],
        env=env,
    )
    assert client.returncode == 0 and "'host':" in client.stdout, client.stderr
    status = worker_b.run([*cli_command("status", "--json", "--redis-url", url)], env=env)
    assert status.returncode == 0, status.stderr
    assert '"Where"' in status.stdout


def _pings(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except redis.exceptions.RedisError:
        time.sleep(0.1)
        return False
