"""Every request is a job, and a caller may name it: `X-Request-ID` becomes the job id, so a caller whose
connection broke fetches the result at `GET /jobs/{id}`."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import Served


def test_a_chosen_id_is_fetched_after_the_caller_gave_up(served: Served) -> None:
    request_id = f"client-{uuid.uuid4().hex[:12]}"
    with served.http(timeout=0.5) as http, pytest.raises(httpx.ReadTimeout):
        http.post("/strict", json={"sleep": 2}, headers={"X-Request-ID": request_id})
    with served.http() as http:
        done = http.get(f"/jobs/{request_id}", params={"wait": 30}).json()
    assert done["status"] == "succeeded", done
    assert done["result"] == {"slept": 2}


def test_the_answer_carries_the_chosen_id_and_it_cannot_be_reused(served: Served) -> None:
    request_id = str(uuid.uuid4()).upper()  # a UUID is kept in its canonical (lower-case) form
    with served.http() as http:
        first = http.post("/strict", json={"a": 1}, headers={"X-Request-ID": request_id})
        assert first.status_code == 200 and first.headers["x-request-id"] == request_id.lower()
        again = http.post("/strict", json={"a": 2}, headers={"X-Request-ID": request_id})
        assert again.status_code == 409, again.text
        assert again.json()["error"] == "RequestIdInUseError"
        job = http.post("/jobs/strict_echo/echo", json={"args": [5]}, headers={"X-Request-ID": request_id})
        assert job.status_code == 409


def test_a_chosen_id_names_an_async_job(served: Served) -> None:
    request_id = f"job.{uuid.uuid4().hex}"
    with served.http() as http:
        job = http.post("/jobs/strict_echo/echo", json={"args": [7]}, headers={"X-Request-ID": request_id})
        assert job.status_code == 202 and job.json()["job_id"] == request_id
        assert http.get(f"/jobs/{request_id}", params={"wait": 30}).json()["result"] == 7


@pytest.mark.parametrize("bad", ["-starts-with-dash", "has space", "x" * 129, "semi;colon", "slash/inside", "é"])
def test_a_bad_chosen_id_is_refused_with_what_is_allowed(served: Served, bad: str) -> None:
    with served.http() as http:
        response = http.post("/strict", json={"a": 1}, headers={"X-Request-ID": bad.encode()})
    assert response.status_code == 400, response.text
    assert "letters, digits" in response.json()["message"]
