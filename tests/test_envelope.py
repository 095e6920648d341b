"""The request envelope: our builder and Celery's own `send_task` produce messages the replica can read,
and nothing but JSON is ever decoded."""

from __future__ import annotations

import base64
import json
import pickle
import time
import uuid

import pytest
import redis

from celery_serve import BadRequestError
from celery_serve._wire.envelope import build_message, parse_message


def _message(**overrides: object) -> dict:
    fields = {
        "task_id": "t-1",
        "app": "shop",
        "deployment": "Cart",
        "method": "add",
        "args": [1, "two", {"three": 3}],
        "kwargs": {"flag": True},
        "deadline": 1_900_000_000.25,
        "reply_to": "serve:reply:me",
    }
    fields.update(overrides)
    return json.loads(build_message(**fields))  # type: ignore[arg-type]


def test_build_and_parse_round_trip() -> None:
    raw = build_message(
        task_id="t-1",
        app="shop",
        deployment="Cart",
        method="add",
        args=(1, "two", {"three": 3}),
        kwargs={"flag": True},
        deadline=1_900_000_000.25,
        reply_to="serve:reply:me",
    )
    env = parse_message(raw)
    assert (env.task_id, env.task_name, env.method) == ("t-1", "shop.Cart.add", "add")
    assert (env.args, env.kwargs) == ([1, "two", {"three": 3}], {"flag": True})
    assert env.deadline == pytest.approx(1_900_000_000.25)
    assert env.reply_to == "serve:reply:me"
    assert env.http is None
    assert env.embed == {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def test_message_is_a_celery_protocol_2_json_message_with_an_expires_header() -> None:
    message = _message()
    assert message["content-type"] == "application/json"
    assert message["properties"]["body_encoding"] == "base64"
    assert message["properties"]["delivery_info"]["routing_key"] == "serve.shop.Cart"
    headers = message["headers"]
    assert (headers["task"], headers["id"], headers["lang"]) == ("shop.Cart.add", "t-1", "py")
    assert headers["expires"].startswith("2030-03-17T")
    args, kwargs, embed = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs, set(embed)) == (
        [1, "two", {"three": 3}],
        {"flag": True},
        {"callbacks", "errbacks", "chain", "chord"},
    )


def test_http_requests_ride_in_a_header() -> None:
    http = {"method": "POST", "path": "/x", "query_string": "a=1", "headers": [["h", "v"]], "body": ""}
    env = parse_message(build_message(task_id="t", app="a", deployment="d", method="__call__", http=http))
    assert env.http == http and env.args == [] and env.deadline is None


def test_arguments_that_are_not_json_are_refused_when_building() -> None:
    with pytest.raises(BadRequestError, match="JSON-serializable"):
        build_message(task_id="t", app="a", deployment="d", method="m", args=[object()])


@pytest.mark.parametrize("content_type", ["application/x-python-serialize", "application/x-yaml", None])
def test_non_json_content_types_are_refused_without_decoding(content_type: str | None) -> None:
    message = _message()
    message["content-type"] = content_type
    message["body"] = base64.b64encode(pickle.dumps(([1], {}, {}))).decode()
    with pytest.raises(BadRequestError, match="only JSON is accepted"):
        parse_message(json.dumps(message))


@pytest.mark.parametrize(
    "raw",
    [
        b"not json at all",
        json.dumps({"content-type": "application/json"}),
        json.dumps({**_message(), "body": base64.b64encode(b"[1, 2").decode()}),
        json.dumps({**_message(), "headers": {"id": "x"}}),
        json.dumps(["a", "list"]),
    ],
)
def test_malformed_messages_raise_bad_request(raw: bytes | str) -> None:
    with pytest.raises(BadRequestError, match="malformed task message"):
        parse_message(raw)


def test_a_message_sent_by_celery_send_task_is_parsed(redis_url: str, redis_client: redis.Redis) -> None:
    from celery_serve.workers.celery_app import make_celery

    queue = f"serve.unit-{uuid.uuid4().hex[:8]}.Dep"
    celery = make_celery(redis_url)
    try:
        result = celery.send_task("unit.Dep.predict", args=[1, "x"], kwargs={"k": [2]}, queue=queue, expires=30)
    finally:
        celery.close()
    raw = redis_client.rpop(queue)
    assert raw is not None
    env = parse_message(raw)
    assert (env.task_id, env.task_name, env.method) == (result.id, "unit.Dep.predict", "predict")
    assert (env.args, env.kwargs) == ([1, "x"], {"k": [2]})
    assert env.deadline == pytest.approx(time.time() + 30, abs=10)
