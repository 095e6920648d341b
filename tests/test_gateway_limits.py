"""What one slow or malicious client may hold at a real gateway: 431 for oversized or too many headers, 408 for
headers or a body that do not arrive in time, 503 past the per-client connection cap; 200 slowloris sockets
neither block a normal request nor outlive the header deadline."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from celery_serve._runtime.launcher import ProcessGroup
from tests.conftest import Served, start_gateway, wait_until

pytestmark = pytest.mark.timeout(180)

HEADER_TIMEOUT_S = 2
BODY_TIMEOUT_S = 2
PER_CLIENT = 220


@pytest.fixture(scope="module")
def gateway(served: Served) -> Iterator[str]:
    """A gateway of its own with short deadlines, in front of the session's applications."""
    group = ProcessGroup()
    env = {
        "SERVE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "SERVE_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
        "SERVE_MAX_CONNECTIONS_PER_CLIENT": str(PER_CLIENT),
    }
    try:
        yield start_gateway(group, served.redis_url, env)
    finally:
        group.stop()


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _read_all(sock: socket.socket, timeout_s: float) -> bytes:
    sock.settimeout(timeout_s)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk


def test_a_one_mebibyte_header_is_431(gateway: str) -> None:
    response = httpx.post(f"{gateway}/strict", json={"a": 1}, headers={"x-big": "a" * (1 << 20)}, timeout=30)
    assert response.status_code == 431, response.text
    assert "16384 bytes" in response.json()["message"]


def test_too_many_headers_is_431_and_a_normal_request_is_not(gateway: str) -> None:
    many = {f"x-h{i}": "v" for i in range(150)}
    response = httpx.post(f"{gateway}/strict", json={"a": 1}, headers=many, timeout=30)
    assert response.status_code == 431, response.text
    assert "more than 100 headers" in response.json()["message"]
    some = {f"x-h{i}": "v" for i in range(40)}
    assert httpx.post(f"{gateway}/strict", json={"a": 1}, headers=some, timeout=30).status_code == 200


def test_headers_that_never_end_get_408_and_the_connection_closes(gateway: str) -> None:
    with socket.create_connection(_address(gateway)) as sock:
        sock.sendall(b"POST /strict HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        answer = _read_all(sock, HEADER_TIMEOUT_S + 10)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"did not arrive within 2 s" in answer


def test_a_trickled_body_gets_408_and_never_becomes_a_job(gateway: str) -> None:
    request_id = f"trickle-{uuid.uuid4().hex}"
    head = (
        f"POST /strict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n"
        f"X-Request-ID: {request_id}\r\n\r\n"
    ).encode()
    with socket.create_connection(_address(gateway)) as sock:
        sock.sendall(head)
        answer = b""
        sock.settimeout(0.5)
        deadline = time.monotonic() + BODY_TIMEOUT_S + 10
        while time.monotonic() < deadline and not answer:
            try:
                sock.sendall(b" ")  # one byte every half second: the body never completes in time
                answer = sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
        answer += _read_all(sock, 5)
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"SERVE_BODY_TIMEOUT_S" in answer
    assert httpx.get(f"{gateway}/jobs/{request_id}", timeout=10).status_code == 404


def test_slowloris_sockets_block_nobody_and_are_closed_at_the_deadline(gateway: str) -> None:
    slow = []
    try:
        for _ in range(200):
            sock = socket.create_connection(_address(gateway))
            sock.sendall(b"GET /strict HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            slow.append(sock)
        opened = time.monotonic()
        # a normal request is answered while they are open
        response = httpx.post(f"{gateway}/strict", json={"ok": True}, timeout=10)
        assert response.status_code == 200 and response.json() == {"ok": True}
        answers = [_read_all(sock, max(0.1, HEADER_TIMEOUT_S + 10 - (time.monotonic() - opened))) for sock in slow]
        assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers), {a[:40] for a in answers}
    finally:
        for sock in slow:
            sock.close()


def test_one_client_cannot_hold_more_than_its_share_of_connections(gateway: str) -> None:
    held = []
    try:
        for _ in range(PER_CLIENT):
            held.append(socket.create_connection(_address(gateway)))
        with socket.create_connection(_address(gateway)) as extra:
            answer = _read_all(extra, 10)
        assert answer.startswith(b"HTTP/1.1 503 "), answer
        assert f"limit of {PER_CLIENT} connections".encode() in answer
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: httpx.get(f"{gateway}/-/healthz", timeout=5).status_code == 200, timeout_s=20)
