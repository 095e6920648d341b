"""Streaming, end to end: real redis-server, real Celery workers, real HTTP through the gateway.

Incremental delivery is shown by order, not time: the deployment holds its stream at a chunk until the
test releases it, and the test reads the chunks before that point first. Whether a generator was
stopped is read from a key its `finally` writes in the replica.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import httpx
import pytest
import redis

import celery_serve as serve
from celery_serve import DeploymentHandle, RemoteError, StreamUsageError
from celery_serve._runtime.launcher import ProcessGroup
from celery_serve._wire import keys as _keys
from tests import stream_deployments as sd
from tests.conftest import _stop_workers_together, start_gateway, thread_count, wait_until

pytestmark = pytest.mark.timeout(240)

ROUTES = {
    "textgen": (sd.textgen_app, "/textgen"),
    "streams": (sd.app, "/streamtest"),
    "sse": (sd.sse_app, "/sse"),
    "streamapi": (sd.api_app, "/streamapi"),
    "batched": (sd.batched_app, "/batched"),
    "many": (sd.many_app, "/many"),
    "caller": (sd.caller_app, "/caller"),
    "chain": (sd.chain_app, "/chain"),
}


class Apps:
    def __init__(self, redis_url: str, gateway_url: str, handles: dict[str, DeploymentHandle]) -> None:
        self.redis_url = redis_url
        self.gateway_url = gateway_url
        self.handles = handles

    def http(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.gateway_url, timeout=60.0, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def apps(redis_url: str) -> Iterator[Apps]:
    from celery_serve._runtime import serve as _serve
    from celery_serve._runtime.launcher import free_port

    owned = _serve._session is None
    port = free_port()
    with ThreadPoolExecutor(len(ROUTES)) as pool:
        futures = {
            name: pool.submit(
                serve.run, app, name=name, route_prefix=prefix, port=port, redis_url=redis_url, startup_timeout_s=150
            )
            for name, (app, prefix) in ROUTES.items()
        }
        handles = {name: f.result() for name, f in futures.items()}
    session = _serve._session
    assert session is not None and session.gateway_url is not None
    yield Apps(redis_url, session.gateway_url, handles)
    if owned:
        _stop_workers_together()
        _serve.shutdown()


@pytest.fixture
def r(apps: Apps) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(apps.redis_url)
    yield client
    client.close()


def tag() -> str:
    return uuid.uuid4().hex[:12]


# --- HTTP ------------------------------------------------------------------------------------------------


def test_rays_streaming_response_example_streams_every_number(apps: Apps) -> None:
    with apps.http() as http, http.stream("GET", "/textgen", params={"max": 10}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        assert response.headers["transfer-encoding"] == "chunked"
        assert response.headers["x-request-id"]
        parts = [part for part in response.iter_raw() if part]
    assert b"".join(parts) == b"0123456789"
    assert len(parts) > 1  # it came in pieces, not as one body
    with apps.http() as http:
        metrics = http.get("/metrics").text
    assert "serve_streams_in_flight" in metrics and "serve_stream_first_chunk_seconds_count" in metrics
    chunks = next(line for line in metrics.splitlines() if line.startswith("serve_stream_chunks_total"))
    assert float(chunks.split()[-1]) >= 10


def test_http_stream_is_incremental_and_resumes_after_a_dropped_connection(apps: Apps, r: redis.Redis) -> None:
    t = tag()
    with apps.http() as http:
        with http.stream("GET", "/streamtest", params={"n": 6, "tag": t, "hold_at": 3}) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]  # with the headers, before any chunk
            got = b""
            lines = response.iter_raw()
            while got.count(b"\n") < 3:  # chunks 0..2 arrive while the generator is held before chunk 3
                got += next(lines)
            assert got == b"line 0\nline 1\nline 2\n"
        # the client dropped after chunk 2; it reconnects at once and asks for chunk 3 on
        r.rpush(sd.release_key(t), 1)
        resumed = http.get(f"/jobs/{request_id}/stream", params={"from": 3})
        assert resumed.status_code == 200
        assert resumed.text == "line 3\nline 4\nline 5\n"
        assert resumed.headers["x-stream-from"] == "3"
        replay = http.get(f"/jobs/{request_id}/stream")
        assert replay.text == "".join(f"line {i}\n" for i in range(6))
        job = wait_until(lambda: (j := http.get(f"/jobs/{request_id}").json())["status"] == "succeeded" and j)
        assert job["result"] == {"stream": f"/jobs/{request_id}/stream", "chunks": 6}
        assert job["stream_url"] == f"/jobs/{request_id}/stream"


def test_the_last_step_of_a_chain_streams(apps: Apps) -> None:
    with apps.http() as http, http.stream("GET", "/chain", params={"text": "abc"}) as response:
        assert response.status_code == 200 and response.headers["x-request-id"]
        assert b"".join(response.iter_raw()) == b"A\nB\nC\n"


def test_fastapi_ingress_route_streams_with_its_headers(apps: Apps) -> None:
    with apps.http() as http:
        with http.stream("GET", "/streamapi/tokens", params={"n": 4}) as response:
            assert response.status_code == 200
            assert response.headers["x-model"] == "tiny"
            body = b"".join(response.iter_raw())
        assert body == b"tok0 tok1 tok2 tok3 "
        plain = http.get("/streamapi/plain")  # a non-streaming route of the same ingress is unchanged
        assert plain.json() == {"hello": "world"}
        assert plain.headers["content-length"] == str(len(plain.content))


def test_server_sent_events_carry_chunk_ids_and_resume_with_last_event_id(apps: Apps, r: redis.Redis) -> None:
    t = tag()
    with apps.http() as http:
        with http.stream("GET", "/sse", params={"n": 5, "tag": t, "hold_at": 2}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            request_id = response.headers["x-request-id"]
            got = b""
            parts = response.iter_raw()
            while got.count(b"\n\n") < 2:
                got += next(parts)
        assert got == b"id: 0\ndata: token 0\n\nid: 1\ndata: token 1\n\n"
        r.rpush(sd.release_key(t), 1)
        resumed = http.get(f"/jobs/{request_id}/stream", headers={"Last-Event-ID": "1"})
        assert resumed.text == "id: 2\ndata: token 2\n\nid: 3\ndata: token 3\n\nid: 4\ndata: token 4\n\n"
        bad = http.get(f"/jobs/{request_id}/stream", headers={"Last-Event-ID": "abc"})
        assert bad.status_code == 400 and "Last-Event-ID" in bad.json()["message"]


def test_an_error_mid_stream_is_an_sse_error_event_and_fails_the_job(apps: Apps) -> None:
    with apps.http() as http:
        response = http.get("/sse", params={"n": 2, "fail": "1"})
        assert response.status_code == 200  # the headers went out before the error
        events = response.text.split("\n\n")
        assert events[:2] == ["id: 0\ndata: token 0", "id: 1\ndata: token 1"]
        assert events[2].startswith("event: error\ndata: ")
        error = json.loads(events[2].split("data: ", 1)[1])
        assert error["error"] == "RuntimeError" and error["message"] == "generation failed"
        request_id = response.headers["x-request-id"]
        job = wait_until(lambda: (j := http.get(f"/jobs/{request_id}").json())["status"] == "failed" and j)
        assert job["error"] == {"type": "RuntimeError", "message": "generation failed"}
        replay = http.get(f"/jobs/{request_id}/stream")  # the chunks before the error stay readable
        assert replay.text.startswith("id: 0\ndata: token 0\n\nid: 1\ndata: token 1\n\nevent: error")


def test_a_client_that_read_a_stream_to_its_end_finds_its_job_ended(apps: Apps) -> None:
    """A stream's last entry (its end, or its error) is written with the request's result, in one call: a
    client that read the end and then asks for the job is never told "running" (it was, 9 times in 400
    tries, when the end went out before the result)."""
    with apps.http() as http:
        for _ in range(40):
            done = http.get("/sse", params={"n": 2})
            assert http.get(f"/jobs/{done.headers['x-request-id']}").json()["status"] == "succeeded"
            failed = http.get("/sse", params={"n": 2, "fail": "1"})
            assert failed.text.split("\n\n")[2].startswith("event: error")
            assert http.get(f"/jobs/{failed.headers['x-request-id']}").json()["status"] == "failed"
            job = http.post("/jobs/Streamer/numbers", params={"app": "streams"}, json={"args": [2]}).json()
            assert http.get(f"/jobs/{job['job_id']}/stream").text == "0\n1\n"
            assert http.get(f"/jobs/{job['job_id']}").json()["status"] == "succeeded"


def test_a_raw_stream_that_fails_is_cut_off_not_a_short_success(apps: Apps) -> None:
    with apps.http() as http:
        job = http.post("/jobs/Streamer/failing", params={"app": "streams"}, json={"args": [2]}).json()
        with pytest.raises(httpx.RemoteProtocolError):
            http.get(f"/jobs/{job['job_id']}/stream")
        wrapped = http.get(f"/jobs/{job['job_id']}/stream", headers={"Accept": "text/event-stream"})
        assert wrapped.text.startswith("id: 0\ndata: chunk 0\n\nid: 1\ndata: chunk 1\n\nevent: error\n")
        assert "model broke after 2 chunks" in wrapped.text


def test_streaming_job_submitted_with_post_jobs_streams_the_same_way(apps: Apps) -> None:
    with apps.http() as http:
        accepted = http.post("/jobs/Streamer/numbers", params={"app": "streams"}, json={"args": [4]})
        assert accepted.status_code == 202
        job_id = accepted.json()["job_id"]
        stream = http.get(f"/jobs/{job_id}/stream")  # waits for the stream if the job has not started yet
        assert stream.status_code == 200
        assert stream.headers["content-type"] == "application/x-ndjson"
        assert stream.text == "0\n1\n2\n3\n"
        assert http.get(f"/jobs/{job_id}/stream", params={"from": 2}).text == "2\n3\n"
        not_a_stream = http.post("/jobs/Streamer/plain", params={"app": "streams"}, json={"args": [2]}).json()
        answer = http.get(f"/jobs/{not_a_stream['job_id']}/stream")
        assert answer.status_code == 409 and "without streaming" in answer.json()["message"]
        assert http.get(f"/jobs/{uuid.uuid4()}/stream").status_code == 404


def test_the_stream_caps_end_the_stream_with_a_clear_error(apps: Apps) -> None:
    capped = serve.get_deployment_handle("NumberStreamer", "caller").options(stream=True)
    items = []
    with pytest.raises(serve.StreamLimitError, match="cap of 4096 bytes .*stream_max_bytes"):
        for item in capped.big.remote(5, 1500):
            items.append(item)
    assert len(items) == 2  # 3,000 bytes fit under the 4,096-byte cap; the third chunk does not
    with pytest.raises(serve.StreamLimitError, match="cap of 20 chunks .*stream_max_chunks"):
        list(capped.big.remote(25, 1))
    items = []
    with pytest.raises(serve.StreamLimitError, match="SERVE_STREAM_MAX_BYTES"):  # the default cap, 64 MiB
        for item in apps.handles["streams"].options(stream=True).big.remote(3, 30 * 1024 * 1024):
            items.append(len(item))
    assert items == [30 * 1024 * 1024] * 2


def test_a_chunk_with_no_json_form_ends_the_stream_with_an_error_never_null(apps: Apps) -> None:
    got = []
    no_json = r"chunk 2 of the stream is not valid JSON: nan at \$ has no JSON form"
    with pytest.raises(serve.ResultNotJSONError, match=no_json):
        for item in apps.handles["streams"].options(stream=True).scores.remote(2):
            got.append(item)
    assert got == [0.0, 0.5]
    with apps.http() as http:
        job = http.post("/jobs/Streamer/scores", params={"app": "streams"}, json={"args": [1]}).json()
        wrapped = http.get(f"/jobs/{job['job_id']}/stream", headers={"Accept": "text/event-stream"})
        assert wrapped.text.startswith("id: 0\ndata: 0.0\n\nevent: error\n")
        assert "ResultNotJSONError" in wrapped.text and "null" not in wrapped.text


# --- handles ---------------------------------------------------------------------------------------------


def test_handle_stream_true_iterates_with_for_and_async_for(apps: Apps) -> None:
    handle = apps.handles["streams"]
    assert list(handle.options(stream=True).numbers.remote(5)) == [0, 1, 2, 3, 4]

    async def collect() -> list[str]:
        return [w async for w in handle.options(stream=True).words.remote("a b c")]

    assert asyncio.run(collect()) == ["a", "b", "c"]


def test_rays_deployment_response_generator_example_streams_through_a_deployment(apps: Apps) -> None:
    handle = apps.handles["caller"]
    # Outside a deployment: use a standard `for` loop.
    gen = handle.options(stream=True).remote(10)
    assert [i for i in gen] == list(range(10))


def test_stream_misuse_is_a_clear_error_both_ways(apps: Apps) -> None:
    handle = apps.handles["streams"]
    with pytest.raises(StreamUsageError, match=r"options\(stream=True\)"):
        handle.numbers.remote(3).result()
    with pytest.raises(StreamUsageError, match="not a generator"):
        list(handle.options(stream=True).plain.remote(3))


def test_an_error_mid_stream_raises_remote_error_after_the_chunks(apps: Apps) -> None:
    got = []
    with pytest.raises(RemoteError, match="model broke after 2 chunks"):
        for item in apps.handles["streams"].options(stream=True).failing.remote(2):
            got.append(item)
    assert got == ["chunk 0", "chunk 1"]


# --- cancellation ----------------------------------------------------------------------------------------


def test_client_disconnect_stops_the_generator_after_the_grace_period(apps: Apps, r: redis.Redis) -> None:
    t = tag()
    with apps.http() as http:
        job = http.post("/jobs/Streamer/endless", params={"app": "streams"}, json={"args": [t]}).json()
        # a job runs on after its reader leaves
        with http.stream("GET", f"/jobs/{job['job_id']}/stream") as response:
            next(response.iter_raw())
        before = int(r.get(sd.progress_key(t)) or 0)
        wait_until(lambda: int(r.get(sd.progress_key(t)) or 0) > before + 5, timeout_s=20)
        assert r.get(sd.closed_key(t)) is None
        assert http.delete(f"/jobs/{job['job_id']}").status_code == 200  # DELETE stops a stream
        wait_until(lambda: r.get(sd.closed_key(t)), timeout_s=20, what="the job's generator to close")


def test_a_dropped_synchronous_stream_is_cancelled_after_the_grace_period(apps: Apps, r: redis.Redis) -> None:
    t = tag()
    with apps.http() as http:
        with http.stream("GET", "/streamtest", params={"endless": t}) as response:
            request_id = response.headers["x-request-id"]
            next(response.iter_raw())
        # the client left; nobody re-attaches: the generator is stopped after the grace period (5 s)
        wait_until(lambda: r.get(sd.closed_key(t)), timeout_s=30, what="the abandoned generator to be stopped")
        job = wait_until(lambda: (j := http.get(f"/jobs/{request_id}").json())["status"] == "cancelled" and j)
        assert job["status"] == "cancelled"


def test_a_dropped_stream_someone_reattached_to_runs_on(apps: Apps, r: redis.Redis) -> None:
    t = tag()
    with apps.http() as http:
        with http.stream("GET", "/streamtest", params={"endless": t}) as response:
            request_id = response.headers["x-request-id"]
            next(response.iter_raw())
        with http.stream("GET", f"/jobs/{request_id}/stream", params={"from": 1}) as resumed:
            parts = resumed.iter_raw()
            before = int(r.get(sd.progress_key(t)) or 0)
            while int(r.get(sd.progress_key(t)) or 0) < before + 150:  # 7.5 s: past the grace period
                next(parts)
            assert r.get(sd.closed_key(t)) is None
        http.delete(f"/jobs/{request_id}")
        wait_until(lambda: r.get(sd.closed_key(t)), timeout_s=30, what="the cancelled generator to be stopped")


# --- batching --------------------------------------------------------------------------------------------


def test_batched_async_generator_streams_each_caller_its_own_tokens(apps: Apps, r: redis.Redis) -> None:
    handle = apps.handles["batched"]
    r.delete(f"{sd.KEY_PREFIX}batch-sizes")
    t = tag()
    held = handle.hold.remote(t)  # the replica is busy: the three calls below queue up together
    wait_until(lambda: r.get(sd.progress_key(t)), what="the replica to be held")
    counts = [2, 4, 3]
    gens = [handle.options(stream=True).generate.remote(n) for n in counts]
    wait_until(lambda: r.llen(_keys.queue("batched", "Batched")) == 3, what="the three calls to queue")
    r.rpush(sd.release_key(t), 1)
    assert held.result(timeout_s=30) == "released"
    with ThreadPoolExecutor(len(counts)) as pool:
        streams = list(pool.map(list, gens))
    assert streams == [[f"{n}:{s}" for s in range(n)] for n in counts]
    sizes = [int(x) for x in r.lrange(f"{sd.KEY_PREFIX}batch-sizes", 0, -1)]
    assert max(sizes) > 1  # they really ran as one batch


# --- gateway restart -------------------------------------------------------------------------------------


def test_a_stream_resumes_on_another_gateway_after_its_gateway_died(apps: Apps, r: redis.Redis) -> None:
    group = ProcessGroup()
    try:
        url = start_gateway(group, apps.redis_url)
        t = tag()
        with httpx.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", "/streamtest", params={"n": 5, "tag": t, "hold_at": 2}) as response:
                request_id = response.headers["x-request-id"]
                got = b""
                parts = response.iter_raw()
                while got.count(b"\n") < 2:
                    got += next(parts)
                for process in group.processes:  # the gateway dies mid-stream
                    process.proc.kill()
        r.rpush(sd.release_key(t), 1)
        with apps.http() as other:
            resumed = other.get(f"/jobs/{request_id}/stream", params={"from": 2})
        assert resumed.text == "line 2\nline 3\nline 4\n"
    finally:
        group.stop()


# --- clients ---------------------------------------------------------------------------------------------


def test_client_stream_over_http_and_over_redis(apps: Apps) -> None:
    for client in (
        serve.Client(apps.gateway_url, app="streams"),
        serve.Client(redis_url=apps.redis_url, app="streams"),
    ):
        with client:
            assert list(client.stream("Streamer.numbers", 4)) == [0, 1, 2, 3]
            assert list(client.stream("Streamer.words", "x y")) == ["x", "y"]
            got = []
            with pytest.raises(RemoteError, match="model broke"):
                for item in client.stream("Streamer.failing", 1):
                    got.append(item)
            assert got == ["chunk 0"]
            with pytest.raises(StreamUsageError):
                list(client.stream("Streamer.plain", 1))

    async def use_async() -> list[str]:
        async with serve.AsyncClient(apps.gateway_url, app="streams") as client:
            return [w async for w in client.stream("Streamer.words", "p q r")]

    assert asyncio.run(use_async()) == ["p", "q", "r"]


def test_a_client_left_mid_stream_exits_clean(apps: Apps) -> None:
    """A script that leaves a stream early and closes its client exits without asyncio's complaints ("Task
    was destroyed but it is pending!", "unclosed event loop"), which it used to print at exit."""
    script = (
        "import os, celery_serve as serve\n"
        "for how in ({'redis_url': os.environ['TO_REDIS']}, {'url': os.environ['TO_GATEWAY']}):\n"
        "    with serve.Client(**how, app='streams') as client:\n"
        "        for item in client.stream('Streamer.numbers', 50):\n"
        "            break\n"
        "        assert list(client.stream('Streamer.numbers', 3)) == [0, 1, 2]\n"
        "print('done')\n"
    )
    env = {**os.environ, "TO_REDIS": apps.redis_url, "TO_GATEWAY": apps.gateway_url}
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0 and done.stdout.strip() == "done", done.stderr[-3000:]
    for complaint in ("Task was destroyed", "unclosed event loop", "Exception ignored"):
        assert complaint not in done.stderr, done.stderr[-3000:]


def test_http_client_stream_resumes_by_itself_after_its_connection_is_reset(apps: Apps, r: redis.Redis) -> None:
    from tests.tcp_proxy import TcpProxy

    url = urlsplit(apps.gateway_url)
    proxy = TcpProxy(url.hostname or "127.0.0.1", url.port or 80).start()
    t = tag()
    try:
        with serve.Client(f"http://{proxy.address}", app="streams") as client:
            got = []
            for item in client.stream("Streamer.gated", t, 6, 3):
                got.append(item["i"])
                if len(got) == 3:  # the generator is held before item 3: break the connection now
                    assert proxy.reset_all() >= 1
                    r.rpush(sd.release_key(t), 1)
        assert got == [0, 1, 2, 3, 4, 5]  # resumed at item 3: no gap, no repeat
        assert r.get(sd.closed_key(t)) is None  # the generator ran to its end (it was not restarted)
        assert int(r.get(sd.progress_key(t)) or 0) == 6
    finally:
        proxy.stop()


def test_leaving_a_redis_client_stream_early_stops_the_generator(apps: Apps, r: redis.Redis) -> None:
    t = tag()
    with serve.Client(redis_url=apps.redis_url, app="streams") as client:
        for n, _ in enumerate(client.stream("Streamer.endless", t)):
            if n == 2:
                break
    wait_until(lambda: r.get(sd.closed_key(t)), timeout_s=20, what="the generator to be closed")


# --- many streams at once --------------------------------------------------------------------------------

STREAMS = 1000
MAX_GATEWAY_THREADS = 50


async def _hold_streams(host: str, port: int, t: str, pid: int, release: Callable[[], None]) -> tuple[list[bytes], int]:
    peak = thread_count(pid)

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, thread_count(pid))
            await asyncio.sleep(0.02)

    firsts = 0
    all_first = asyncio.Event()

    async def one(i: int) -> bytes:
        nonlocal firsts
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(f"GET /many?tag={t}&i={i} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            raw = b""
            while f"first {i}\n".encode() not in raw:
                part = await reader.read(65536)
                assert part, f"stream {i} closed before its first chunk: {raw!r}"
                raw += part
            firsts += 1
            if firsts == STREAMS:
                all_first.set()
            raw += await reader.read()  # to the end (Connection: close)
            return raw
        finally:
            writer.close()

    sampler = asyncio.create_task(sample())
    tasks = [asyncio.create_task(one(i)) for i in range(STREAMS)]
    try:
        await asyncio.wait_for(all_first.wait(), timeout=120)  # every stream is open and has sent a chunk
        release()
        return list(await asyncio.gather(*tasks)), peak
    finally:
        sampler.cancel()
        for task in tasks:
            task.cancel()


def _dechunk(raw: bytes) -> tuple[bytes, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, body = out + body[:size], body[size + 2 :]
    return head, out


def test_a_thousand_concurrent_streams_through_one_gateway_with_fewthread_count(apps: Apps, r: redis.Redis) -> None:
    group = ProcessGroup()
    try:
        url = urlsplit(start_gateway(group, apps.redis_url))
        pid = group.processes[0].proc.pid
        t = tag()
        results, peak = asyncio.run(
            _hold_streams(url.hostname or "127.0.0.1", url.port or 80, t, pid, lambda: r.set(sd.release_key(t), 1))
        )
    finally:
        group.stop()
    for i, raw in enumerate(results):
        head, body = _dechunk(raw)
        assert head.startswith(b"HTTP/1.1 200"), head
        assert body == f"first {i}\n{i}.0\n{i}.1\n{i}.2\n".encode()
    assert peak < MAX_GATEWAY_THREADS, f"the gateway ran {peak} threads with {STREAMS} streams open"


def test_a_stream_whose_producer_is_gone_ends_with_an_error_not_a_hang(apps: Apps, r: redis.Redis) -> None:
    """A replica that died mid-stream, its request dead-lettered: the stream has no end, the job ended."""
    from celery_serve._wire import keys as _keys
    from celery_serve._wire import streams as _streams

    job_id = str(uuid.uuid4())
    head = {"status_code": 200, "headers": [["content-type", "text/plain"]]}
    r.xadd(_streams.key(job_id), {"k": "h", "d": json.dumps(head)}, id=_streams.HEAD_ID)
    r.xadd(_streams.key(job_id), {"k": "c", "t": "s", "d": "partial"}, id=_streams.chunk_id(0))
    r.hset(_keys.job(job_id), mapping={"status": "running", "kind": "async", "app": "streams"})
    for key in (_streams.key(job_id), _keys.job(job_id)):
        r.expire(key, 600)
    with apps.http() as http, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(http.get, f"/jobs/{job_id}/stream", headers={"Accept": "text/event-stream"})
        r.hset(_keys.job(job_id), "status", "failed")
        text = pending.result(timeout=60).text
    assert text.startswith("id: 0\ndata: partial\n\nevent: error\n")
    assert "stopped before its end: the job ended failed" in text


def test_handle_stream_cancel_stops_the_generator(apps: Apps, r: redis.Redis) -> None:
    t = tag()
    gen = apps.handles["streams"].options(stream=True).endless.remote(t)
    assert [next(gen), next(gen)] == ["tick 0\n", "tick 1\n"]
    gen.cancel()
    wait_until(lambda: r.get(sd.closed_key(t)), timeout_s=20, what="the generator to be closed")


def test_flower_shows_a_stream_as_one_task(apps: Apps) -> None:
    from celery_serve._runtime import serve as _serve

    auth = ("flower", "s3cret")
    url = _serve.start_flower(port=None, basic_auth=":".join(auth))
    try:
        handle = apps.handles["streams"].options(stream=True)
        calls = [0]

        def seen() -> list[dict[str, object]]:
            assert list(handle.numbers.remote(3)) == [0, 1, 2]  # replicas send events once Flower asks
            calls[0] += 1
            tasks = httpx.get(f"{url}/api/tasks", params={"limit": "1000"}, auth=auth, timeout=20).json()
            return [t for t in tasks.values() if t.get("name") == "streams.Streamer.numbers"]

        tasks = wait_until(seen, timeout_s=90, interval_s=0.5, what="Flower to show the streams")
        assert all(task["state"] in ("RECEIVED", "STARTED", "SUCCESS") for task in tasks)
        done = wait_until(
            lambda: [t for t in seen() if t["state"] == "SUCCESS"], timeout_s=30, what="a finished stream task"
        )
        assert done[0]["runtime"] is not None and done[0]["received"]
        assert len(seen()) <= calls[0]  # one task per stream (3 chunks each), not one per chunk
    finally:
        session = _serve._session
        if session is not None:
            session.group.stop({"flower"})
            session.flower_url = None


def test_a_replica_killed_mid_stream_ends_the_stream_with_an_error(apps: Apps, r: redis.Redis) -> None:
    """Last in this module: it kills the Streamer replica (its worker starts another)."""
    import os
    import signal

    from celery_serve._wire import keys as _keys

    t = tag()
    with apps.http() as http:
        job = http.post("/jobs/Streamer/endless", params={"app": "streams"}, json={"args": [t]}).json()
        with http.stream(
            "GET", f"/jobs/{job['job_id']}/stream", headers={"Accept": "text/event-stream"}, timeout=120
        ) as response:
            parts = response.iter_raw()
            got = next(parts)
            replicas = r.hgetall(_keys.replicas("streams", "Streamer"))
            for raw in replicas.values():
                os.kill(json.loads(raw)["pid"], signal.SIGKILL)
            for part in parts:
                got += part
        text = got.decode()
        assert text.startswith("id: 0\ndata: tick 0\n")
        assert "\nevent: error\ndata: " in text  # an error, not a hang and not a silent end
        assert wait_until(lambda: http.get(f"/jobs/{job['job_id']}").json()["status"] == "failed", timeout_s=60)
