"""Strict JSON at the door and on the wire: bad input is a 400 on every path, NaN results a 500 naming the
deployment, integers wider than 64 bits exact end to end."""

from __future__ import annotations

import math

import pytest

from celery_serve._wire import strictjson
from celery_serve._wire.envelope import build_message, parse_message
from tests.conftest import Served

WIDE = 2**80 + 1
NEGATIVE_WIDE = -(2**63) - 1
BAD_BODIES = {
    "invalid": b"{not json",
    "nan": b"[NaN]",
    "infinity": b'{"x": Infinity}',
    "out_of_range": b"[1e400]",
    "deep": b"[" * 100_000 + b"]" * 100_000,
    "lone_surrogate": b'{"name": "\\ud800", "count": 1}',
}


# --- the codec ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_loads_refuses_what_is_not_strict_json(body: bytes) -> None:
    with pytest.raises(strictjson.NotJSONError):
        strictjson.loads(body)


def test_deep_nesting_says_so() -> None:
    with pytest.raises(strictjson.NotJSONError, match="nested deeper than 1024"):
        strictjson.loads(BAD_BODIES["deep"])


def test_wide_integers_survive_a_round_trip() -> None:
    value = {"big": WIDE, "neg": NEGATIVE_WIDE, "list": [2**64, 1.5, "12345678901234567890123"]}
    assert strictjson.loads(strictjson.dumps(value)) == value
    assert strictjson.loads(b"[18446744073709551616]") == [2**64]


@pytest.mark.parametrize("value", [math.nan, [1.0, {"a": math.inf}], {"wide": WIDE, "x": -math.inf}])
def test_dumps_refuses_non_finite_numbers(value: object) -> None:
    with pytest.raises(strictjson.NotJSONError, match="no JSON form"):
        strictjson.dumps(value)


def test_dumps_names_where_the_nan_is() -> None:
    with pytest.raises(strictjson.NotJSONError, match=r"\$\[1\]\.score"):
        strictjson.dumps([1, {"score": math.nan}, None])


def test_task_message_keeps_wide_integers() -> None:
    raw = build_message(task_id="t", app="a", deployment="d", method="m", args=[WIDE], kwargs={"n": NEGATIVE_WIDE})
    env = parse_message(raw)
    assert env.args == [WIDE] and env.kwargs == {"n": NEGATIVE_WIDE}


# --- real gateway and replicas ------------------------------------------------------------------------


def _queued_jobs(served: Served) -> int:
    import redis

    client = redis.Redis.from_url(served.redis_url)
    try:
        return sum(1 for _ in client.scan_iter("serve:job:*", count=1000))
    finally:
        client.close()


@pytest.mark.parametrize("name", BAD_BODIES.keys())
def test_bad_json_is_400_on_every_path(served: Served, name: str) -> None:
    body = BAD_BODIES[name]
    json_header = {"content-type": "application/json"}
    with served.http() as http:
        answers = {
            "sync": http.post("/strict", content=body, headers=json_header),
            "route job": http.post("/jobs/-/strict", content=body, headers=json_header),
            "deployment job": http.post("/jobs/strict_echo/echo", content=body),
            "ingress": http.post("/strict-api/item", content=body, headers=json_header),
        }
    for path, response in answers.items():
        assert response.status_code == 400, (path, response.status_code, response.text[:300])
        assert "not valid JSON" in response.json()["message"], (path, response.text[:300])


def test_wide_integers_are_exact_on_every_path(served: Served) -> None:
    payload = b'{"big": 1208925819614629174706177, "neg": -9223372036854775809}'
    expected = {"big": WIDE, "neg": NEGATIVE_WIDE}
    with served.http() as http:
        sync = http.post("/strict", content=payload, headers={"content-type": "application/json"})
        assert sync.status_code == 200, sync.text
        assert strictjson.loads(sync.content) == expected
        job = http.post("/jobs/strict_echo/echo", content=b'{"args": [' + payload + b"]}")
        assert job.status_code == 202, job.text
        done = http.get(f"/jobs/{job.json()['job_id']}", params={"wait": 30}).json()
        assert done["status"] == "succeeded", done
        assert done["result"] == expected
    handle = served.handles["strict"]
    assert handle.echo.remote([WIDE, NEGATIVE_WIDE]).result(timeout_s=30) == [WIDE, NEGATIVE_WIDE]


@pytest.mark.parametrize("text", ["nan", "inf", "-inf"])
def test_a_non_finite_result_is_a_500_naming_the_deployment(served: Served, text: str) -> None:
    with served.http() as http:
        response = http.post("/strict", json={"float": text})
        assert response.status_code == 500, response.text
        body = response.json()
        assert body["error"] == "ResultNotJSONError" and body["deployment"] == "strict_echo", body
        assert "strict_echo" in body["message"] and "$.score" in body["message"], body
        job = http.post("/jobs/strict_echo/non_finite", json={"args": [text]}).json()
        done = http.get(f"/jobs/{job['job_id']}", params={"wait": 30}).json()
    assert done["status"] == "failed" and done["error"]["type"] == "ResultNotJSONError", done


def test_rejected_bodies_never_become_jobs(served: Served) -> None:
    before = _queued_jobs(served)
    with served.http() as http:
        for body in BAD_BODIES.values():
            http.post("/strict", content=body, headers={"content-type": "application/json"})
    assert _queued_jobs(served) == before


def test_a_body_without_content_type_never_reaches_an_ingress_as_loose_json(served: Served) -> None:
    """FastAPI (>= 0.132, strict_content_type) reads a body as JSON only when it says it is JSON, and the
    gateway checks every body that does: NaN cannot reach a FastAPI model by leaving the header out."""
    with served.http() as http:
        loose = http.post("/strict-api/item", content=b'{"name": "a", "count": NaN}')
        assert loose.status_code == 422, loose.text  # FastAPI's own validation: the body is not parsed as JSON
        declared = http.post(
            "/strict-api/item", content=b'{"name": "a", "count": NaN}', headers={"content-type": "application/json"}
        )
        assert declared.status_code == 400 and "not valid JSON" in declared.json()["message"]
        good = http.post("/strict-api/item", json={"name": "a", "count": 2})
        assert good.status_code == 200 and good.json() == {"name": "a", "count": 2}
