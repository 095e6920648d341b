"""celery-serve on a Redis Cluster: the same applications, unchanged, on `redis+cluster://`.

Real processes: three cluster-enabled redis-servers owning a third of the slots each, and the real
`celery-serve run` (gateway, workers, scaler, Flower) pointed at them. Sync HTTP, jobs, chains (one with a
parallel step), streams, the Python client straight over Redis, autoscaling (the scaler grows a pool with
Celery's remote control) and the CLI all work, and the deployments' keys land on more than one shard.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from celery_serve import Client
from celery_serve._runtime.launcher import ProcessGroup, free_port
from celery_serve._runtime.spec import build_spec
from celery_serve._wire import keys as _keys
from celery_serve._wire import results as _results
from celery_serve._wire.connections import sync_client, wait_for_redis
from celery_serve._wire.envelope import build_message, parse_message
from celery_serve._wire.jobs import JobStore, describe
from celery_serve._wire.slots import key_slot, task_id_for
from celery_serve._wire.transport import QueueTransport
from celery_serve._wire.urls import parse_redis_url
from celery_serve.exceptions import (
    BackpressureError,
    DeploymentConfigError,
    RequestIdInUseError,
    ServeError,
    ServiceUnavailableError,
)
from celery_serve.status import read_snapshot
from celery_serve.workers.celery_app import kombu_url
from tests import pipeline_deployments as pd
from tests.conftest import wait_until
from tests.redis_cluster import ClusterSet, start_cluster
from tests.test_examples import READY_LINE, CliProcess, cli_command

pytestmark = pytest.mark.timeout(300)

SERVICE = textwrap.dedent(
    """
    import time
    from collections.abc import Generator

    import celery_serve as serve


    @serve.deployment(num_replicas=2)
    class Echo:
        def __call__(self, value):
            return {"echo": value}


    @serve.deployment
    def upper(value) -> str:
        text = value.query_params.get("text", "") if hasattr(value, "query_params") else value
        return str(text).upper()


    @serve.deployment
    def exclaim(text: str) -> str:
        return text + "!"


    @serve.deployment
    def length(text: str) -> int:
        return len(text)


    @serve.deployment
    def reverse(text: str) -> str:
        return text[::-1]


    @serve.deployment
    def combine(parts: list) -> dict:
        return {"parts": parts}


    @serve.deployment
    class Counter:
        def numbers(self, n: int) -> Generator[int, None, None]:
            yield from range(n)


    @serve.deployment(
        autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                            "upscale_delay_s": 0.5, "downscale_delay_s": 60, "metrics_interval_s": 0.25},
        max_ongoing_requests=1, num_cpus=0.25,
    )
    def slow(value):
        time.sleep(0.2)
        return value


    @serve.deployment
    def pause(value):
        time.sleep(2)
        return value


    @serve.deployment(max_ongoing_requests=1)
    class After:
        def __init__(self):
            self.seen = 0

        def __call__(self, value):
            self.seen += 1
            return value

        def count(self):
            return self.seen


    echo = Echo.bind()
    chain = upper.bind() >> exclaim.bind()
    fan = upper.bind() >> serve.parallel(length.bind(), reverse.bind()) >> combine.bind()
    fan_first = serve.parallel(length.bind(), reverse.bind()) >> combine.bind()
    counter = Counter.bind()
    slow_app = slow.bind()
    paused = pause.bind() >> After.bind()
    """
)

CONFIG = textwrap.dedent(
    """
    applications:
      - {name: echo, import_path: "svc:echo", route_prefix: /echo}
      - {name: chain, import_path: "svc:chain", route_prefix: /chain}
      - {name: fan, import_path: "svc:fan", route_prefix: /fan}
      - {name: fanfirst, import_path: "svc:fan_first", route_prefix: /fanfirst}
      - {name: counter, import_path: "svc:counter", route_prefix: /counter}
      - {name: slow, import_path: "svc:slow_app", route_prefix: /slow}
      - {name: paused, import_path: "svc:paused", route_prefix: /paused}
    """
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSet]:
    group = ProcessGroup()
    try:
        yield start_cluster(group, shards=3)
    finally:
        group.stop()


def test_cluster_urls_are_read_and_bad_ones_refused() -> None:
    target = parse_redis_url("redis+cluster://:s3cret@10.0.0.1:7000,10.0.0.2")
    assert target.kind == "cluster" and target.hosts == (("10.0.0.1", 7000), ("10.0.0.2", 6379))
    assert target.password == "s3cret"
    with pytest.raises(DeploymentConfigError, match="cluster"):
        parse_redis_url("redis+cluster://10.0.0.1:7000/3")  # a cluster has database 0 only
    with pytest.raises(DeploymentConfigError, match="host:port"):
        parse_redis_url("redis+cluster://:7000")
    port = free_port()  # nothing listens there: one clear line, not a traceback
    with pytest.raises(ServeError, match=f"cannot reach Redis at redis\\+cluster://127.0.0.1:{port}"):
        wait_for_redis(f"redis+cluster://127.0.0.1:{port}", timeout_s=0.5)
    # Celery's broker on a cluster: kombu's redis transport that finds its slot's owner; no secret in its options
    broker, options = kombu_url(f"redis+cluster://:s3cret@127.0.0.1:{port}")
    assert broker == f"serve-cluster://:s3cret@127.0.0.1:{port}/0", broker
    assert options == {"global_keyprefix": "{serve-celery}", "serve_cluster_nodes": f"127.0.0.1:{port}"}


def test_request_ids_land_in_their_deployments_slot() -> None:
    for app, deployment in [("echo", "Echo"), ("shop", "Cart"), ("a", "b")]:
        slot = key_slot(_keys.deployment_slot_key(app, deployment))
        for _ in range(50):
            task_id = task_id_for(app, deployment)
            assert len(task_id) == 36 and task_id.count("-") == 4
            for key in (_keys.job(task_id), _keys.result(task_id), _keys.queue(app, deployment, gpu=True)):
                assert key_slot(key) == slot
            assert key_slot(_keys.replica_inflight(app, deployment, "r1")) == slot
    # the data-loss marker lives with the applications, so losing their shard is noticed (and they re-announce)
    assert key_slot(_keys.EPOCH) == key_slot(_keys.APPS) == key_slot(_keys.OWNERS)


def test_applications_serve_on_a_three_shard_cluster(cluster: ClusterSet, tmp_path: Path) -> None:
    (tmp_path / "svc.py").write_text(SERVICE)
    (tmp_path / "serve.yaml").write_text(CONFIG)
    run = CliProcess.serve("serve.yaml", cluster.url, tmp_path, SERVE_MACHINE_CPUS="16", FLOWER_BASIC_AUTH="f:cluster")
    base = run.base_url
    try:
        run.wait_for_line(READY_LINE, 180)
        with httpx.Client(base_url=base, timeout=30) as http:
            # synchronous HTTP, many requests: they spread over the replicas and are all answered rightly
            for i in range(20):
                response = http.post("/echo", json=i)
                assert response.status_code == 200, response.text
            # an asynchronous job
            accepted = http.post("/jobs/Echo", json="a job")
            assert accepted.status_code == 202, accepted.text
            job = http.get(f"/jobs/{accepted.json()['job_id']}", params={"wait": 30}).json()
            assert job["status"] == "succeeded" and job["result"] == {"echo": "a job"}, job
            # chains: each step's deployment in its own slot, the job in its first step's
            assert http.post("/chain", params={"text": "abc"}).text == "ABC!"
            assert http.post("/fan", params={"text": "abc"}).json() == {"parts": [3, "CBA"]}
            with Client(redis_url=cluster.url, app="chain") as client:
                assert client.call("upper >> exclaim", "abc") == "ABC!"
            with Client(redis_url=cluster.url, app="fan") as client:
                assert client.call("upper >> parallel(length, reverse) >> combine", "abc") == {"parts": [3, "CBA"]}
            # a pipeline that starts with a parallel step: its job and first branch in one slot, the other branch
            # in its own (queued once the job is accepted): a call and a job from the client over Redis
            slots = {key_slot(_keys.deployment_slot_key("fanfirst", name)) for name in ("length", "reverse")}
            assert len(slots) == 2, slots
            with Client(redis_url=cluster.url, app="fanfirst") as client:
                assert client.call("parallel(length, reverse) >> combine", "abc") == {"parts": [3, "cba"]}
                fanned = client.submit("parallel(length, reverse) >> combine", "abcd")
                assert fanned.result(timeout_s=30) == {"parts": [4, "dcba"]} and fanned.status() == "succeeded"
            # a request id chosen by the client (as Envoy and nginx set X-Request-ID on every request): its slot is
            # not its deployment's, so the job is stored under an id in the right slot, which the chosen one leads
            # to; every read by the chosen id finds it, and the id names one job only
            chosen = http.post("/echo", json=1, headers={"X-Request-ID": "my-own-id-1"})
            assert chosen.status_code == 200 and chosen.json()["echo"]["path"] == "/echo", chosen.text
            assert chosen.headers["x-request-id"] == "my-own-id-1"
            with sync_client(cluster.url) as reader:
                stored = reader.get(_keys.alias("my-own-id-1"))
            echo_slot = key_slot(_keys.deployment_slot_key("echo", "Echo"))
            assert key_slot(_keys.result("my-own-id-1")) != echo_slot  # so it must lead elsewhere
            assert stored and key_slot(_keys.result(stored.decode())) == echo_slot, stored
            job = http.get("/jobs/my-own-id-1").json()
            assert job["job_id"] == "my-own-id-1" and job["status"] == "succeeded", job
            assert job["result"] == chosen.json(), job
            again = http.post("/echo", json=2, headers={"X-Request-ID": "my-own-id-1"})
            assert again.status_code == 409 and "already names a job" in again.json()["message"], again.text
            accepted = http.post("/jobs/Counter/numbers", json=4, headers={"X-Request-ID": "my-own-job-1"})
            assert accepted.status_code == 202 and accepted.json()["job_id"] == "my-own-job-1", accepted.text
            streamed = http.get("/jobs/my-own-job-1/stream", params={"format": "items"})
            assert streamed.status_code == 200 and streamed.headers["x-request-id"] == "my-own-job-1", streamed.text
            lines = [json.loads(line) for line in streamed.text.splitlines()]
            assert [line["v"] for line in lines[:-1]] == [0, 1, 2, 3] and lines[-1] == {"end": 4}, lines
            job = http.get("/jobs/my-own-job-1", params={"wait": 30}).json()
            assert job["status"] == "succeeded" and job["stream_url"] == "/jobs/my-own-job-1/stream", job
            waiting = http.post("/jobs/pause", json=2, headers={"X-Request-ID": "my-own-job-2"})
            assert waiting.status_code == 202, waiting.text
            cancelled = http.delete("/jobs/my-own-job-2").json()
            assert cancelled["job_id"] == "my-own-job-2" and cancelled["status"] == "cancelled", cancelled
        # the Python client straight over Redis: calls, jobs and streams
        with Client(redis_url=cluster.url, app="echo") as client:
            assert client.call("Echo", "direct") == {"echo": "direct"}
            assert client.submit("Echo", "queued").result(timeout_s=30) == {"echo": "queued"}
        with Client(redis_url=cluster.url, app="counter") as client:
            assert list(client.stream("Counter.numbers", 5)) == [0, 1, 2, 3, 4]
        with Client(url=base, app="counter") as client:  # over HTTP, a streamed job
            assert list(client.stream("Counter.numbers", 3)) == [0, 1, 2]
        # a chain cancelled during its first step goes no further (its next step is in another slot). Sync
        # work is not interrupted: the first step runs to its end, and then must not hand its result on.
        with Client(redis_url=cluster.url, app="paused") as client, sync_client(cluster.url) as watcher:
            job = client.submit("pause >> After", "x")
            wait_until(lambda: job.status() == "running", timeout_s=30, what="the chain's first step to start")
            job.cancel()
            wait_until(
                lambda: (found := read_snapshot(watcher).find("paused", "pause")) is not None and found.in_flight == 0,
                timeout_s=30,
                what="the first step to end",
            )
            assert job.status() == "cancelled"
            assert client.call("After.count") == 0, "the cancelled chain's second step ran"  # queued behind it
            # a next step already queued when its chain was cancelled (a cancel between the hand-on and the
            # take): its job is in another slot, so the take cannot see it ended; the replica reads it, drops the
            # step and acknowledges it
            after_queue = _keys.queue("paused", "After")
            late = build_message(
                task_id=task_id_for("paused", "After"),
                app="paused",
                deployment="After",
                method="__call__",
                args=["late"],
                job_id=job.id,
                retention_s=600,
                job_elsewhere=True,
            )
            watcher.lpush(after_queue, late)
            wait_until(
                lambda: (
                    watcher.llen(after_queue) == 0
                    and (found := read_snapshot(watcher).find("paused", "After")) is not None
                    and found.in_flight == 0
                ),
                timeout_s=30,
                what="the late step to be taken and acknowledged",
            )
            assert client.call("After.count") == 0, "a step of a cancelled chain ran"
            assert client.call("pause >> After", "y") == "y" and client.call("After.count") == 1
        # autoscaling: the scaler grows a pool through Celery's remote control on the cluster's broker node
        with Client(redis_url=cluster.url, app="slow") as client:
            pending = [client.submit("slow", i) for i in range(40)]
            with sync_client(cluster.url) as watcher:
                wait_until(
                    lambda: (found := read_snapshot(watcher).find("slow", "slow")) is not None and found.replicas == 2,
                    timeout_s=60,
                    what="a second replica of the autoscaled deployment",
                )
            assert [job.result(timeout_s=60) for job in pending] == list(range(40))
        # the CLI and Flower on the same URL
        status = subprocess.run(
            [*cli_command("status", "--json", "--redis-url", cluster.url)], capture_output=True, text=True, env=run.env
        )
        assert status.returncode == 0 and '"Echo"' in status.stdout and '"combine"' in status.stdout, status.stderr
        assert httpx.get(f"http://127.0.0.1:{run.flower_port}/healthcheck", timeout=5).status_code in (200, 401)
        # Flower's Broker view knows no cluster: celery-serve's Flower reads the deployments' queues in their slots
        flower, auth = f"http://127.0.0.1:{run.flower_port}", ("f", "cluster")
        wait_until(
            lambda: any(
                name.startswith("echo.Echo.")
                for name in httpx.get(f"{flower}/api/workers", params={"refresh": "1"}, auth=auth, timeout=20).json()
            ),
            timeout_s=60,
            interval_s=0.5,
            what="Flower to list the workers",
        )
        queues = httpx.get(f"{flower}/api/queues/length", auth=auth, timeout=20)
        assert queues.status_code == 200, queues.text
        depths = {q["name"]: q["messages"] for q in queues.json()["active_queues"]}
        assert depths.get(_keys.queue("echo", "Echo")) == 0, depths
        broker_page = httpx.get(f"{flower}/broker", auth=auth, timeout=20)
        assert broker_page.status_code == 200 and _keys.queue("echo", "Echo") in broker_page.text

        # the deployments' keys are spread over the shards, each with its requests' keys
        owners = {
            cluster.node_for_slot(key_slot(_keys.deployment_slot_key(app, dep)))
            for app, dep in [("echo", "Echo"), ("chain", "upper"), ("chain", "exclaim"), ("fan", "length"),
                             ("fan", "reverse"), ("fan", "combine"), ("counter", "Counter")]
        }  # fmt: skip
        assert len(owners) >= 2, owners
        sizes = {port: redis.Redis(port=port).dbsize() for port in cluster.ports}
        assert sum(1 for size in sizes.values() if size > 0) >= 2, sizes
    finally:
        run.stop()


def test_a_parallel_first_step_whose_branches_cannot_be_queued_ends_its_job(
    redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a cluster a parallel first step's other branches are queued after its job is accepted, in their own
    slots. When that fails, the submit fails with 503 and the job ends cancelled with the reason: it must not
    read `queued` forever for a branch that never runs. (A transport in cluster mode on one real Redis: the
    slots are the same computation, and the failure is injected at the branches' push.)"""
    spec = build_spec(pd.fan_first_app, f"fanfirst-{free_port()}", None)
    first, second = (spec.deployments[name] for name in spec.pipeline[0])
    direct = redis.Redis.from_url(redis_url)

    def read_job(job_id: str) -> dict[str, object]:
        raw = direct.get(_keys.result(job_id))
        return describe(job_id, direct.hgetall(_keys.job(job_id)), _results.decode(raw) if raw else None)

    async def submit(fail: bool) -> str:
        transport = QueueTransport(redis_url)
        transport.cluster = True
        await transport.start()
        try:
            if fail:  # the branches' LPUSHes fail (the queue-room check before them passes)
                real = transport.redis.pipeline

                def breaking_pipeline(*args: Any, **kwargs: Any) -> Any:
                    pipe = real(*args, **kwargs)
                    execute = pipe.execute

                    async def checked(*a: Any, **k: Any) -> Any:
                        if any(command[0][0] == "LPUSH" for command in pipe.command_stack):
                            raise redis.exceptions.ConnectionError("the shard of the second branch is gone")
                        return await execute(*a, **k)

                    pipe.execute = checked
                    return pipe

                monkeypatch.setattr(transport.redis, "pipeline", breaking_pipeline)
            sub = await transport.submit(spec, args=["abc"], expect_reply=False, job=True)
            return sub.task_id
        finally:
            monkeypatch.undo()
            await transport.close()

    try:
        job_id = asyncio.run(submit(fail=False))  # both branches queued, each naming the job as elsewhere
        queued = [parse_message(direct.rpop(d.queue)) for d in (first, second)]
        assert [m.job_id for m in queued] == [job_id, job_id]
        assert [m.headers["serve_job"] for m in queued] == [m.task_id for m in queued]
        assert read_job(job_id)["status"] == "queued"

        with pytest.raises(ServiceUnavailableError, match="parallel first step could not be queued"):
            asyncio.run(submit(fail=True))
        assert direct.llen(second.queue) == 0 and direct.llen(first.queue) == 1
        orphan = parse_message(direct.rpop(first.queue))
        ended = read_job(orphan.job_id)
        assert ended["status"] == "cancelled", ended
        assert (
            ended["error"]
            == {  # type: ignore[comparison-overlap]
                "type": "ServiceUnavailableError",
                "message": ended["error"]["message"],  # type: ignore[index]
            }
            and "could not be queued on every Redis Cluster shard" in ended["error"]["message"]
        ), ended  # type: ignore[index]
        assert _results.decode(direct.get(_keys.result(orphan.job_id)))["http_status"] == 503
    finally:
        direct.delete(first.queue, second.queue)
        direct.close()


def test_a_chosen_request_id_on_a_cluster_names_one_job_and_is_freed_when_not_accepted(redis_url: str) -> None:
    """On a cluster a caller-chosen id (`X-Request-ID`) leads to a job stored under an id in its deployment's slot.
    The id is claimed before the enqueue, so it names one job even when two requests race for it; a request
    refused (its queue full) frees it for the caller's retry. (A transport in cluster mode on one real Redis:
    the slots are the same computation.)"""
    spec = build_spec(pd.upper.options(max_queued_requests=1).bind(), f"chosen-{free_port()}", None)
    dep = spec.deployments["upper"]
    slot = key_slot(_keys.deployment_slot_key(dep.app, dep.name))
    direct = redis.Redis.from_url(redis_url)

    async def scenario() -> None:
        transport = QueueTransport(redis_url)
        transport.cluster = True
        jobs = JobStore(transport.redis)
        jobs._cluster = True
        await transport.start()
        try:
            first = await transport.submit(dep, args=["a"], task_id="chosen-1", expect_reply=False, job=True)
            assert first.request_id == "chosen-1" and key_slot(_keys.result(first.task_id)) == slot, first
            job = await jobs.get("chosen-1")
            assert job["job_id"] == "chosen-1" and job["status"] == "queued", job
            with pytest.raises(RequestIdInUseError, match="already names a job"):
                await transport.submit(dep, args=["b"], task_id="chosen-1", expect_reply=False, job=True)
            assert direct.llen(dep.queue) == 1
            # refused (the queue holds its one allowed request): the id is free again for the retry
            with pytest.raises(BackpressureError):
                await transport.submit(dep, args=["c"], task_id="chosen-2", expect_reply=False, job=True)
            assert direct.get(_keys.alias("chosen-2")) is None
            direct.delete(dep.queue)
            retried = await transport.submit(dep, args=["c"], task_id="chosen-2", expect_reply=False, job=True)
            assert retried.request_id == "chosen-2"
            cancelled = await jobs.cancel("chosen-2")
            assert cancelled["job_id"] == "chosen-2" and cancelled["status"] == "cancelled", cancelled
            assert (await jobs.wait("chosen-2", 1.0))["status"] == "cancelled"
            # two requests racing for one new id: one is accepted, the other refused, one message queued
            direct.delete(dep.queue)
            raced = await asyncio.gather(
                *(transport.submit(dep, args=[i], task_id="chosen-3", expect_reply=False, job=True) for i in range(2)),
                return_exceptions=True,
            )
            assert sorted(type(r).__name__ for r in raced) == ["RequestIdInUseError", "Submitted"], raced
            assert direct.llen(dep.queue) == 1
            # a Redis fault with the outcome unknown: the id is freed only if the request is not there. Its answer
            # lost after the enqueue ran: the id keeps leading to the job (as on a single Redis, the retry is 409
            # and GET /jobs/<id> finds it); lost before it ran: the id is free for the retry
            direct.delete(dep.queue)
            batcher = transport._batcher_for(dep.app, dep.name)
            real = batcher.enqueue

            async def answer_lost(keys: list[str], args: list[Any]) -> Any:
                await real(keys, args)
                raise redis.exceptions.ConnectionError("connection reset after the enqueue")

            async def never_sent(keys: list[str], args: list[Any]) -> Any:
                raise redis.exceptions.ConnectionError("connection refused")

            for fault, chosen, kept in ((answer_lost, "chosen-4", True), (never_sent, "chosen-5", False)):
                batcher.enqueue = fault  # type: ignore[method-assign]
                with pytest.raises(redis.exceptions.ConnectionError):
                    await transport.submit(dep, args=["d"], task_id=chosen, expect_reply=False, job=True)
                batcher.enqueue = real  # type: ignore[method-assign]
                assert (direct.get(_keys.alias(chosen)) is not None) is kept, chosen
            assert (await jobs.get("chosen-4"))["status"] == "queued"
            direct.delete(dep.queue)
            assert (await transport.submit(dep, args=["e"], task_id="chosen-5", expect_reply=False)).request_id
        finally:
            await jobs.close()
            await transport.close()

    try:
        asyncio.run(scenario())
    finally:
        direct.delete(dep.queue)
        direct.close()


def test_a_request_lost_with_a_shard_that_restarted_empty_fails_with_503_before_its_deadline(
    cluster: ClusterSet,
) -> None:
    """A shard other than the applications' restarts without its data (no persistence): the data-loss marker is
    on another shard and cannot see it. A caller waiting on a request that shard held must still hear that it was
    lost (503, retry) within seconds, not a 504 at its deadline. (Last in this module: it empties a shard.)"""
    apps_node = cluster.node_for_slot(key_slot(_keys.APPS))
    shard = next(port for port in cluster.ports if port != apps_node)
    app = next(f"lost-{i}" for i in range(10_000) if cluster.node_for_slot(
        key_slot(_keys.deployment_slot_key(f"lost-{i}", "upper"))) == shard)  # fmt: skip
    dep = build_spec(pd.upper.options(request_timeout_s=120).bind(), app, None).deployments["upper"]

    async def scenario() -> dict[str, Any] | None:
        transport = QueueTransport(cluster.url)
        await transport.start()
        try:
            sub = await transport.submit(dep, args=["never served"])  # nothing serves it: it waits, queued
            assert redis.Redis(port=shard).llen(dep.queue) == 1
            cluster.kill(shard)
            cluster.restart(shard)  # back with its slots (nodes.conf), without its data
            wait_until(
                lambda: b"cluster_state:ok" in redis.Redis(port=shard).execute_command("CLUSTER", "INFO"),
                timeout_s=30,
                what="the restarted shard to serve its slots",
            )
            assert redis.Redis(port=shard).llen(dep.queue) == 0
            return await asyncio.wait_for(transport.wait(sub, dep.name), timeout=60)
        finally:
            await transport.close()

    record = asyncio.run(scenario())
    assert record is not None and record["http_status"] == 503, record
    assert "was lost" in record["result"]["exc_message"], record
