"""A Redis Cluster shard fails over under load: nobody steps in, and no accepted request is left hanging.

Real processes: three primaries with a replica each (cluster-enabled redis-servers on loopback) and the real
`celery-serve run` pointed at them. Jobs are submitted without pause while the primary that owns the
deployment's slot (or Celery's) is killed; Redis Cluster promotes its replica, and every part follows by
itself: the gateway answers 503 until then, replicas and workers reconnect, remote control works again.

Replication in a cluster is asynchronous, so a job accepted in the last moment before the kill may be gone
with the dead primary. Such a job must then say so (404: no such job), never read `queued` or `running`
forever; every other accepted job must succeed once, with its own result. With `SERVE_REDIS_WAIT_REPLICAS=1`
a job counts as accepted only once the shard's replica holds it, and then none may be gone.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from celery_serve._runtime.launcher import ProcessGroup
from celery_serve._runtime.spec import build_spec
from celery_serve._wire import keys as _keys
from celery_serve._wire.envelope import parse_message
from celery_serve._wire.slots import key_slot
from celery_serve._wire.transport import QueueTransport
from celery_serve.workers.celery_app import make_celery
from celery_serve.workers.cluster_broker import CELERY_SLOT_TAG
from tests.conftest import wait_until
from tests.deployments import probe_app
from tests.redis_cluster import ClusterSet, start_cluster
from tests.test_examples import READY_LINE, CliProcess
from tests.test_sentinel import SERVICE, Ledger

pytestmark = pytest.mark.timeout(300)

KILL_WINDOW_S = 0.5  # jobs accepted this close to the kill may not have reached the replica


@pytest.fixture
def cluster() -> Iterator[ClusterSet]:
    group = ProcessGroup()
    try:
        yield start_cluster(group, shards=3, replicas=True)
    finally:
        group.stop()


@pytest.mark.parametrize(
    ("victim", "replica_wait"),
    [("deployment", 0), ("celery", 0), ("deployment", 1)],
    ids=["deployment", "celery", "deployment-with-replica-wait"],
)
def test_a_shard_failover_needs_no_one_and_strands_no_request(
    cluster: ClusterSet, tmp_path: Path, victim: str, replica_wait: int
) -> None:
    """`victim`: the shard that dies owns the deployment's slot (its queue, its jobs), or Celery's (the
    workers' control queues and remote control, which kombu reaches through one node). With `replica_wait`,
    the dead primary comes back (as the new primary's replica: requests need one to be accepted)."""
    (tmp_path / "svc.py").write_text(SERVICE)
    wait_env = {"SERVE_REDIS_WAIT_REPLICAS": str(replica_wait)} if replica_wait else {}
    run = CliProcess.serve("svc:app", cluster.url, tmp_path, **wait_env)
    base = run.base_url
    ledger, stop = Ledger(), threading.Event()
    try:
        run.wait_for_line(READY_LINE, 180)
        deployment_slot = key_slot(_keys.deployment_slot_key("default", "Echo"))
        slot = deployment_slot if victim == "deployment" else key_slot(CELERY_SLOT_TAG)
        loaders = [threading.Thread(target=ledger.submit, args=(base, stop)) for _ in range(3)]
        for loader in loaders:
            loader.start()
        ledger.await_accepted(30)
        old_primary = cluster.node_for_slot(slot)
        killed_at = time.monotonic()
        cluster.kill(old_primary)
        new_primary = cluster.wait_for_failover(slot, old_primary)
        if replica_wait:
            cluster.restart(old_primary)
            cluster.wait_for_replica(new_primary)
        ledger.await_accepted(30)  # serving on the promoted replica (or on by the other shards), no one stepping in
        stop.set()
        for loader in loaders:
            loader.join()
        assert new_primary in cluster.replica_ports

        after = wait_until(
            lambda: (
                (r := httpx.post(f"{base}/jobs/Echo", json="after the failover", timeout=30)).status_code == 202 and r
            ),
            30,
            what="a request accepted after the failover",
        )
        assert ledger.slowest_s < 25, ledger.slowest_s  # refused at once during the failover, never left hanging
        # Celery's remote control (the scaler's pool_grow, Flower's inspection) reaches the worker again
        control = make_celery(cluster.url).control
        wait_until(lambda: control.ping(timeout=1.0), 30, what="the worker to answer a remote-control ping")
        with httpx.Client(base_url=base, timeout=60) as http:
            stranded, wrong, gone = [], [], []
            for job_id, value in {**ledger.accepted, after.json()["job_id"]: "after the failover"}.items():
                response = http.get(f"/jobs/{job_id}", params={"wait": 60})
                job = response.json()
                near_kill = abs(ledger.accepted_at.get(job_id, 0.0) - killed_at) < KILL_WINDOW_S
                if response.status_code == 404 and near_kill:
                    gone.append(job_id)  # accepted by the dead primary, not yet on its replica: said so
                elif job.get("status") != "succeeded":
                    stranded.append((job_id, response.status_code, job))
                elif job["result"] != {"echo": value}:
                    wrong.append((job_id, job))
        assert len(ledger.accepted) > 20
        assert stranded == [] and wrong == [], (len(stranded), stranded[:3], wrong[:3])
        assert len(gone) <= (0 if replica_wait else 3), gone  # with the wait, every accepted job survives
    except BaseException:
        print(run.output[-20000:])  # what the gateway, workers and scaler said, for the failure report
        raise
    finally:
        stop.set()
        run.stop()


def test_the_replica_wait_is_confirmed_by_the_shard_that_owns_the_request(cluster: ClusterSet) -> None:
    """`WAIT` must run on the connection that wrote the request, on the primary that owns its slot: accepted
    while that shard's replica is in sync, refused (and taken off the queue) while it is stopped."""
    spec = build_spec(probe_app, "waited", "/waited")
    deployment = spec.deployments[spec.ingress]
    primary = cluster.node_for_slot(key_slot(_keys.deployment_slot_key(deployment.app, deployment.name)))
    cluster.wait_for_replica(primary)
    follower = int(redis.Redis(port=primary).info("replication")["slave0"]["port"])

    async def submit() -> str:
        transport = QueueTransport(cluster.url, wait_replicas=1, wait_timeout_ms=300)
        await transport.start()
        try:
            return (await transport.submit(deployment, args=[1], expect_reply=False, job=True)).task_id
        finally:
            await transport.close()

    accepted = asyncio.run(submit())
    cluster.nodes[follower].proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match="only 0 of the 1 Redis replicas"):
            asyncio.run(submit())
    finally:
        cluster.nodes[follower].proc.send_signal(signal.SIGCONT)
    owner = redis.Redis(port=primary)
    assert [parse_message(m).task_id for m in owner.lrange(deployment.queue, 0, -1)] == [accepted]  # withdrawn
    assert owner.hget(_keys.job(accepted), "status") == b"queued"

    # a caller-chosen id leads to its job through a key in the id's own slot, on another shard here: that shard's
    # replica confirms it too, or the request is refused before it is queued and the id is left free
    chosen = next(
        f"picked-{i}" for i in range(1000) if cluster.node_for_slot(key_slot(_keys.alias(f"picked-{i}"))) != primary
    )
    alias_primary = cluster.node_for_slot(key_slot(_keys.alias(chosen)))
    cluster.wait_for_replica(alias_primary)
    alias_follower = int(redis.Redis(port=alias_primary).info("replication")["slave0"]["port"])

    async def submit_chosen() -> str:
        transport = QueueTransport(cluster.url, wait_replicas=1, wait_timeout_ms=300)
        await transport.start()
        try:
            sub = await transport.submit(deployment, args=[2], expect_reply=False, job=True, task_id=chosen)
            assert sub.request_id == chosen
            return sub.task_id
        finally:
            await transport.close()

    cluster.nodes[alias_follower].proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(redis.exceptions.ConnectionError, match=f"confirmed request id '{chosen}'"):
            asyncio.run(submit_chosen())
    finally:
        cluster.nodes[alias_follower].proc.send_signal(signal.SIGCONT)
    assert redis.Redis(port=alias_primary).get(_keys.alias(chosen)) is None
    assert owner.llen(deployment.queue) == 1  # nothing queued for it
    stored = asyncio.run(submit_chosen())  # the retry, with the replica back
    assert redis.Redis(port=alias_primary).get(_keys.alias(chosen)) == stored.encode()
    assert owner.llen(deployment.queue) == 2
