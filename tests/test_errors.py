"""Error paths over HTTP: 404, 500, 400, 413, 503, 504, and a skipped expired request."""

from __future__ import annotations

import base64
import json
import socket
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
import redis

from celery_serve import deployment
from celery_serve._runtime.launcher import ProcessGroup, start_embedded_redis
from celery_serve._runtime.serve import deploy_spec
from celery_serve._runtime.spec import build_spec
from celery_serve._wire import keys as _keys
from celery_serve._wire.envelope import parse_message
from tests.conftest import Served, start_gateway, wait_until
from tests.deployments import executions_key

BODY_LIMIT = 1000


@pytest.fixture(scope="module")
def http(served: Served) -> Iterator[httpx.Client]:
    with served.http() as client:
        yield client


def test_user_exception_is_500_json_without_traceback(http: httpx.Client) -> None:
    response = http.post("/probe", headers={"X-Serve-Call-Method": "fail"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body == {
        "error": "ValueError",
        "message": "probe failed on purpose",
        "deployment": "Probe",
        "request_id": response.headers["x-request-id"],
    }
    assert "Traceback" not in response.text and "deployments.py" not in response.text


def test_malformed_json_read_by_the_deployment_is_400(http: httpx.Client) -> None:
    response = http.post("/probe", content=b'{"unclosed": ', headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == "BadRequestError"
    assert "not valid JSON" in response.json()["message"]


def test_malformed_json_in_a_sync_function_deployment_is_400(http: httpx.Client) -> None:
    response = http.post("/fn", content=b"not json")
    assert response.status_code == 400 and response.json()["error"] == "BadRequestError"


def test_an_exception_after_reading_is_still_500(http: httpx.Client) -> None:
    response = http.post("/fn", json=["a", "list"])  # the function calls .values() on it
    assert response.status_code == 500 and response.json()["error"] == "AttributeError"


def test_queue_full_is_503_with_retry_after_at_once(served: Served, redis_client: redis.Redis) -> None:
    """busy: max_queued_requests=2 and one request at a time. While one request holds the replica,
    two more may wait; the rest are refused at once, before the first finishes, and never run."""
    run = uuid.uuid4().hex[:8]
    finished: list[str] = []
    lock = threading.Lock()

    def get(tag: str, seconds: float) -> httpx.Response:
        with served.http() as client:
            response = client.get("/busy", params={"tag": tag, "s": seconds})
        with lock:
            finished.append(tag)
        return response

    with ThreadPoolExecutor(6) as pool:
        holder = pool.submit(get, f"{run}-holder", 2.0)
        wait_until(lambda: redis_client.get(executions_key(f"{run}-holder")), what="the first request to start")
        tags = [f"{run}-{i}" for i in range(5)]
        responses = dict(zip(tags, pool.map(lambda tag: get(tag, 0.05), tags), strict=True))
        assert holder.result().status_code == 200

    refused = [tag for tag, r in responses.items() if r.status_code == 503]
    assert refused, "no request was refused although the queue was full"
    for tag in refused:
        response = responses[tag]
        assert response.headers["retry-after"] == "1"
        assert response.json()["error"] == "BackpressureError"
        assert "max_queued_requests" in response.json()["message"]
        assert finished.index(tag) < finished.index(f"{run}-holder"), "a 503 came only after the queue drained"
        assert redis_client.get(executions_key(tag)) is None, "a refused request ran"
    for tag in set(tags) - set(refused):
        assert (responses[tag].status_code, responses[tag].text) == (200, tag)


def test_no_result_in_time_is_504_and_the_expired_request_is_skipped(served: Served, redis_client: redis.Redis) -> None:
    """deadline: request_timeout_s=1, one request at a time. A request that waits behind a slow one
    past its deadline is answered 504 and is then dropped by the replica without running."""
    run = uuid.uuid4().hex[:8]
    slow_tag, late_tag = f"{run}-slow", f"{run}-late"

    def get(tag: str, seconds: float) -> httpx.Response:
        with served.http() as client:
            return client.get("/deadline", params={"tag": tag, "s": seconds})

    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(get, slow_tag, 2.5)
        wait_until(lambda: redis_client.get(executions_key(slow_tag)), what="the slow request to start")
        late = get(late_tag, 0)
        slow_response = slow.result()

    for response in (slow_response, late):
        assert response.status_code == 504
        assert response.json()["error"] == "RequestTimeoutError"

    def record(response: httpx.Response) -> dict:
        raw = wait_until(
            lambda: redis_client.get(_keys.result(response.headers["x-request-id"])),
            what="the replica to get to the request",
        )
        return json.loads(raw)

    assert record(late)["status"] == "REVOKED"
    assert redis_client.get(executions_key(late_tag)) is None, "the expired request was executed"
    # The slow one had started before its deadline: it ran to the end, once, and its late result is kept.
    assert record(slow_response)["status"] == "SUCCESS"
    assert redis_client.get(executions_key(slow_tag)) == b"1"


def test_unknown_method_on_a_function_deployment_is_404(http: httpx.Client) -> None:
    response = http.post("/fn", json={}, headers={"X-Serve-Call-Method": "other"})
    assert response.status_code == 404 and "has only __call__" in response.json()["message"]


# --- a gateway of its own: a small body limit, no application at '/', no workers ---------------------


@deployment(request_timeout_s=1.0)
class Ghost:
    """Deployed without workers: requests wait on its queue until their deadline."""


@dataclass
class LonelyGateway:
    url: str
    port: int
    redis: redis.Redis


@pytest.fixture(scope="module")
def lonely() -> Iterator[LonelyGateway]:
    group = ProcessGroup()
    try:
        url = start_embedded_redis(group)
        deploy_spec(url, build_spec(Ghost.bind(), "ghost", "/ghost"))
        gateway = start_gateway(group, url, {"SERVE_MAX_BODY_BYTES": str(BODY_LIMIT)})
        client = redis.Redis.from_url(url)
        yield LonelyGateway(gateway, int(gateway.rsplit(":", 1)[1]), client)
        client.close()
    finally:
        group.stop()


def _raw_exchange(port: int, head: str, *parts: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send a request head and body parts as given; read one response (the request may be unfinished)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode("latin-1"))
        for part in parts:
            sock.sendall(part)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response: {data!r}"
            data += chunk
        head_bytes, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head_bytes.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
        while len(body) < int(headers.get("content-length", 0)):
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(status_line.split()[1]), headers, body


def _chunked(*chunks: bytes) -> list[bytes]:
    return [f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in chunks]


def _queued_bodies(lonely: LonelyGateway) -> list[bytes]:
    raw = lonely.redis.lrange(_keys.queue("ghost", "Ghost"), 0, -1)
    return [base64.b64decode(parse_message(m).http["body"]) for m in raw]  # type: ignore[index]


def test_unknown_route_is_404_listing_the_known_routes(lonely: LonelyGateway) -> None:
    response = httpx.get(f"{lonely.url}/nowhere/at/all")
    assert response.status_code == 404
    body = response.json()
    assert body["error"] == "DeploymentNotFoundError"
    assert "/nowhere/at/all" in body["message"]
    assert body["routes"] == {"/ghost": "Ghost"}


def test_no_worker_means_504_at_the_deadline_and_the_message_carries_it(lonely: LonelyGateway) -> None:
    lonely.redis.delete(_keys.queue("ghost", "Ghost"))
    response = httpx.post(f"{lonely.url}/ghost", content=b"x" * BODY_LIMIT, timeout=30)
    assert response.status_code == 504 and response.json()["error"] == "RequestTimeoutError"
    (raw,) = lonely.redis.lrange(_keys.queue("ghost", "Ghost"), 0, -1)
    envelope = parse_message(raw)
    assert envelope.headers["expires"] and envelope.deadline is not None
    assert envelope.task_id == response.headers["x-request-id"]
    assert base64.b64decode(envelope.http["body"]) == b"x" * BODY_LIMIT  # type: ignore[index]


def test_body_over_the_limit_with_content_length_is_413(lonely: LonelyGateway) -> None:
    head = f"POST /ghost HTTP/1.1\r\nHost: t\r\nContent-Length: {BODY_LIMIT + 1}\r\n\r\n"
    status, headers, body = _raw_exchange(lonely.port, head, b"y" * (BODY_LIMIT + 1))
    assert status == 413
    assert json.loads(body)["error"] == "PayloadTooLargeError" and str(BODY_LIMIT) in json.loads(body)["message"]
    assert headers["connection"] == "close"


def test_a_declared_huge_body_is_refused_before_any_of_it_is_sent(lonely: LonelyGateway) -> None:
    head = "POST /ghost HTTP/1.1\r\nHost: t\r\nContent-Length: 100000000000\r\n\r\n"
    status, _, body = _raw_exchange(lonely.port, head)  # no body at all: a gateway that reads first would hang
    assert status == 413 and json.loads(body)["error"] == "PayloadTooLargeError"


def test_chunked_body_is_refused_as_soon_as_it_passes_the_limit(lonely: LonelyGateway) -> None:
    head = "POST /ghost HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    # Two chunks pass the limit; the request is never finished (no last chunk), so only an early 413 answers.
    status, _, body = _raw_exchange(lonely.port, head, *_chunked(b"a" * 600, b"b" * 600))
    assert status == 413 and "passed the limit" in json.loads(body)["message"]
    assert not any(b.startswith(b"a" * 600) for b in _queued_bodies(lonely)), "the refused body was queued"


def test_chunked_body_under_the_limit_is_passed_on_whole(lonely: LonelyGateway) -> None:
    lonely.redis.delete(_keys.queue("ghost", "Ghost"))
    head = "POST /ghost HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, _, _ = _raw_exchange(lonely.port, head, *_chunked(b"c" * 500, b"d" * 500), b"0\r\n\r\n")
    assert status == 504  # no worker: it waited for its deadline
    assert _queued_bodies(lonely) == [b"c" * 500 + b"d" * 500]


def test_redis_down_is_503_not_a_crash() -> None:
    group = ProcessGroup()
    try:
        url = start_embedded_redis(group)
        deploy_spec(url, build_spec(Ghost.bind(), "ghost", "/ghost"))
        gateway = start_gateway(group, url)
        wait_until(lambda: httpx.get(f"{gateway}/-/routes").json() == {"/ghost": "Ghost"})
        group.stop({"redis"})
        with httpx.Client(base_url=gateway, timeout=30) as client:
            for path in ("/ghost", "/not-a-route"):
                response = client.get(path)
                assert response.status_code == 503, (path, response.text)
                assert response.headers["retry-after"] == "1"
                assert "Redis" in response.json()["message"]
            health = client.get("/-/healthz")
            assert health.status_code == 503 and health.json()["status"] == "unhealthy"
    finally:
        group.stop()
