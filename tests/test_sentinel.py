"""celery-serve on Redis Sentinel: every part takes a `redis+sentinel://` URL, a failover needs no one to
step in, and with `SERVE_REDIS_WAIT_REPLICAS` no accepted request is lost when the master dies.

Real processes: a master with two replicas and three Sentinels (a system redis-server), and the real
`celery-serve run` (gateway, worker, scaler, Flower) pointed at the Sentinels.
"""

from __future__ import annotations

import subprocess
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from celery_serve import Client
from celery_serve._runtime.launcher import ProcessGroup
from celery_serve._wire.urls import parse_redis_url
from celery_serve.exceptions import DeploymentConfigError
from celery_serve.workers.celery_app import kombu_url
from tests.conftest import wait_until
from tests.redis_topologies import SentinelSet, start_sentinel_set
from tests.test_examples import READY_LINE, CliProcess, cli_command

pytestmark = pytest.mark.timeout(300)

SERVICE = textwrap.dedent(
    """
    import celery_serve as serve


    @serve.deployment(num_replicas=2)
    class Echo:
        def __call__(self, value):
            return {"echo": value}


    app = Echo.bind()
    """
)


def test_sentinel_urls_are_read_and_bad_ones_refused() -> None:
    target = parse_redis_url("redis+sentinel://:s3cret@10.0.0.1:26379,10.0.0.2/mymaster/2?sentinel_password=x")
    assert (target.kind, target.master, target.db) == ("sentinel", "mymaster", 2)
    assert target.hosts == (("10.0.0.1", 26379), ("10.0.0.2", 26379))
    assert (target.password, target.sentinel_password) == ("s3cret", "x")
    broker, options = kombu_url(target.url)
    assert broker == "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://:s3cret@10.0.0.2:26379/2"
    assert options == {"master_name": "mymaster", "sentinel_kwargs": {"password": "x"}}
    for bad, why in [
        ("redis+sentinel://h1:26379", "names the master"),
        ("redis+sentinel://h1:port/m", "is not a number"),
        ("redis+sentinel://h1/m/zero", "must be a number"),
        ("localhost:6379", "must start with redis://"),
    ]:
        with pytest.raises(DeploymentConfigError, match=why) as raised:
            parse_redis_url(bad)
        assert "redis+sentinel://host1:26379,host2:26379/mymaster/0" in str(raised.value)
    with pytest.raises(DeploymentConfigError) as redacted_error:
        parse_redis_url("redis+sentinel://:s3cret@h1:x/m")
    assert "s3cret" not in str(redacted_error.value) and "***" in str(redacted_error.value)


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    group = ProcessGroup()
    try:
        yield start_sentinel_set(group, replicas=2, sentinels=3)
    finally:
        group.stop()


class Ledger:
    """Every job the gateway accepted (202), what its result must be, and when it was accepted."""

    def __init__(self) -> None:
        self.accepted: dict[str, str] = {}
        self.accepted_at: dict[str, float] = {}  # time.monotonic() when the 202 came back
        self.refused = 0
        self.slowest_s = 0.0
        self.lock = threading.Lock()

    def await_accepted(self, more: int, timeout_s: float = 60.0) -> None:
        """Wait until `more` jobs more than now were accepted: faults land among real traffic."""
        target = len(self.accepted) + more
        wait_until(lambda: len(self.accepted) >= target, timeout_s, 0.05, what=f"{more} more accepted jobs")

    def submit(self, base: str, stop: threading.Event) -> None:
        with httpx.Client(base_url=base, timeout=30) as http:
            while not stop.is_set():
                value = uuid.uuid4().hex
                started = time.monotonic()
                try:
                    response = http.post("/jobs/Echo", json=value)
                except httpx.HTTPError:
                    response = None
                elapsed = time.monotonic() - started
                with self.lock:
                    self.slowest_s = max(self.slowest_s, elapsed)
                    if response is not None and response.status_code == 202:
                        self.accepted[response.json()["job_id"]] = value
                        self.accepted_at[response.json()["job_id"]] = time.monotonic()
                    else:
                        assert response is None or response.status_code == 503, response.text
                        self.refused += 1
                time.sleep(0.01)


def test_a_master_failover_needs_no_one_and_loses_no_accepted_request(sentinels: SentinelSet, tmp_path: Path) -> None:
    (tmp_path / "svc.py").write_text(SERVICE)
    run = CliProcess.serve("svc:app", sentinels.url, tmp_path, SERVE_REDIS_WAIT_REPLICAS="1")
    base = run.base_url
    ledger, stop = Ledger(), threading.Event()
    try:
        run.wait_for_line(READY_LINE, 180)
        assert httpx.get(f"{base}/jobs/-/", timeout=5).status_code in (404, 405)  # the gateway answers
        # every part works through the Sentinels: the client straight onto Redis, the CLI, Flower
        with Client(redis_url=sentinels.url) as client:
            assert client.call("Echo", "direct") == {"echo": "direct"}
        status = subprocess.run(
            [*cli_command("status", "--json", "--redis-url", sentinels.url)],
            capture_output=True,
            text=True,
            env=run.env,
        )
        assert status.returncode == 0 and '"Echo"' in status.stdout, status.stderr
        assert httpx.get(f"http://127.0.0.1:{run.flower_port}/healthcheck", timeout=5).status_code in (200, 401)

        loaders = [threading.Thread(target=ledger.submit, args=(base, stop)) for _ in range(3)]
        for loader in loaders:
            loader.start()
        ledger.await_accepted(30)
        old_master = sentinels.current_master()
        sentinels.kill(old_master)
        new_master = sentinels.wait_for_failover(old_master)
        ledger.await_accepted(30)  # serving on the promoted replica, with no one stepping in
        stop.set()
        for loader in loaders:
            loader.join()
        assert new_master != old_master

        # accepted again by itself once the remaining replica follows the new master (WAIT needs one)
        after = wait_until(
            lambda: (
                (r := httpx.post(f"{base}/jobs/Echo", json="after the failover", timeout=30)).status_code == 202 and r
            ),
            30,
            what="a request accepted after the failover",
        )
        # requests refused during the failover were answered 503 at once, never left hanging
        assert ledger.slowest_s < 25, ledger.slowest_s
        with httpx.Client(base_url=base, timeout=60) as http:
            lost, wrong = [], []
            for job_id, value in {**ledger.accepted, after.json()["job_id"]: "after the failover"}.items():
                job = http.get(f"/jobs/{job_id}", params={"wait": 60}).json()
                if job.get("status") != "succeeded":
                    lost.append((job_id, job))
                elif job["result"] != {"echo": value}:
                    wrong.append((job_id, job))
        assert len(ledger.accepted) > 20
        assert lost == [] and wrong == [], (len(lost), lost[:3], wrong[:3])
    finally:
        stop.set()
        run.stop()
