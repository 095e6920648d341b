"""Deployments the integration tests serve.

They live at module level so worker processes import them by module path, as they would a user's module.
Deployments that must be observable from outside (what ran, in which process) record it in the Redis the
replica serves from (`REDIS_URL`, set in every replica process), under keys starting with `serve-test:`.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import redis
from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from celery_serve import DeploymentHandle, batch, deployment, ingress

KEY_PREFIX = "serve-test:"


def executions_key(tag: str) -> str:
    """A counter each recorded execution increments (read by the tests)."""
    return f"{KEY_PREFIX}executions:{tag}"


def pids_key(tag: str) -> str:
    """A list of the pids of the replica processes that ran a request."""
    return f"{KEY_PREFIX}pids:{tag}"


_client: redis.Redis | None = None


def _redis() -> redis.Redis:
    global _client
    if _client is None:
        _client = redis.Redis.from_url(os.environ["REDIS_URL"])
    return _client


def record_execution(tag: str) -> int:
    """Count one run of `tag` and note the process; returns how many runs there have been."""
    pipe = _redis().pipeline()
    pipe.incr(executions_key(tag))
    pipe.rpush(pids_key(tag), os.getpid())
    count, _ = pipe.execute()
    return int(count)


# --- handles and composition -------------------------------------------------------------------------


@deployment(user_config={"greeting": "hello"})
class Calc:
    """Plain methods called through handles."""

    def __init__(self) -> None:
        self.calls = 0
        self.user_config: dict[str, Any] | None = None

    def reconfigure(self, config: dict[str, Any]) -> None:
        self.user_config = config

    def get_user_config(self) -> dict[str, Any] | None:
        return self.user_config

    def __call__(self, x: int) -> int:
        return x * 2

    def add(self, a: int, b: int) -> int:
        return a + b

    async def add_async(self, a: int, b: int) -> int:
        await asyncio.sleep(0)
        return a + b

    def count(self) -> int:
        self.calls += 1
        return self.calls

    def boom(self, message: str) -> None:
        raise ValueError(message)

    def sleep(self, seconds: float) -> float:
        time.sleep(seconds)
        return seconds


@deployment
class Fragile:
    """Runs slowly enough that a test can kill its replica in the middle of a request."""

    def work(self, tag: str, seconds: float) -> int:
        record_execution(tag)
        time.sleep(seconds)
        return os.getpid()


@deployment
class Probe:
    """An HTTP ingress that reports what it received; other methods are picked with X-Serve-Call-Method."""

    def __init__(self, calcs: list[DeploymentHandle], by_name: dict[str, DeploymentHandle]) -> None:
        self.calcs = calcs
        self.by_name = by_name

    async def __call__(self, request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "")
        info: dict[str, Any] = {
            "method": request.method,
            "path": request.url.path,
            "query": dict(request.query_params),
            "query_multi": request.query_params.getlist("tag"),
            "headers": dict(request.headers),
            "body": (await request.body()).decode("latin-1"),
        }
        if content_type.startswith("application/json"):
            info["json"] = await request.json()
        elif content_type.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
            form = await request.form()
            fields: dict[str, Any] = {}
            for key, value in form.multi_items():
                if isinstance(value, str):
                    fields[key] = value
                else:
                    fields[key] = {"filename": value.filename, "content": (await value.read()).decode()}
            info["form"] = fields
        return info

    def shout(self, request: Request) -> str:
        return request.body_sync().decode().upper()  # type: ignore[attr-defined]

    def form_fields(self, request: Request) -> dict[str, str]:
        form = request.form_sync()  # type: ignore[attr-defined]
        return {k: v if isinstance(v, str) else f"file {v.filename}" for k, v in form.multi_items()}

    def created(self, request: Request) -> Response:
        return Response(content=b"made it", status_code=201, headers={"x-a": "b"}, media_type="text/x-custom")

    def binary(self, request: Request) -> bytes:
        return bytes(range(256))  # not UTF-8: travels base64-encoded in the result record

    def fail(self, request: Request) -> None:
        raise ValueError("probe failed on purpose")

    async def handles(self) -> dict[str, Any]:
        return {
            "list": [type(h).__name__ for h in self.calcs],
            "dict": {k: type(v).__name__ for k, v in self.by_name.items()},
            "via_list": await self.calcs[0].add.remote(1, 2),
            "via_dict": await self.by_name["calc"].options(method_name="add_async").remote(3, 4),
        }


@deployment(request_timeout_s=1.0, max_ongoing_requests=1)
class Mixed:
    """A batched method beside an unbatched one; one request at a time (sync methods otherwise run side by
    side in threads), so requests queue behind a slow one and pass their deadlines while they wait."""

    @batch(max_batch_size=8)
    def echo(self, items: list[str]) -> list[str]:
        return items

    def slow(self, tag: str, seconds: float) -> str:
        record_execution(tag)
        time.sleep(seconds)
        return tag


calc = Calc.bind()
probe_app = Probe.bind([calc, Fragile.bind()], {"calc": calc, "mixed": Mixed.bind()})


# --- a sync function deployment ------------------------------------------------------------------------


@deployment
def summarize(request: Request) -> dict[str, Any]:
    data = request.json_sync()  # type: ignore[attr-defined]
    return {"keys": sorted(data), "total": sum(data.values()), "scale": request.query_params.get("scale")}


summarize_app = summarize.bind()


# --- FastAPI ingress: the seed's sentiment Classifier (with a stand-in model) plus more FastAPI features ---


class _KeywordSentiment:
    """Stands in for the seed's BERT model: enough to tell that the request reached the replica's instance."""

    def predict(self, text: str) -> dict[str, Any]:
        positive = any(word in text.lower() for word in ("like", "love", "good"))
        return {"label": "POSITIVE" if positive else "NEGATIVE", "text": text, "pid": os.getpid()}


class Item(BaseModel):
    name: str
    price: float


class PublicItem(BaseModel):
    name: str


classifier_api = FastAPI()


@deployment
@ingress(classifier_api)
class Classifier:
    def __init__(self) -> None:
        self.classifier = _KeywordSentiment()

    @classifier_api.get("/test")
    def root(self) -> str:
        return "Sentiment Classifier (0 -> Negative and 1 -> Positive)"

    @classifier_api.get("/healthcheck", status_code=200)
    def healthcheck(self) -> str:
        return "dummy check! Classifier is all ready to go!"

    @classifier_api.post("/classify")
    async def predict_sentiment(self, input_text: str = Query(..., min_length=2)) -> JSONResponse:
        return JSONResponse(self.classifier.predict(input_text))

    @classifier_api.get("/items/{item_id}", response_model=PublicItem)
    def get_item(self, item_id: int) -> dict[str, Any]:
        return {"name": f"item-{item_id}", "price": 9.5, "secret": "never shown"}

    @classifier_api.post("/items", status_code=201)
    def create_item(self, item: Item) -> dict[str, Any]:
        return {"created": item.name, "price": item.price}


classifier_app = Classifier.bind()


# --- limits: a short queue and a short deadline -------------------------------------------------------


@deployment(max_queued_requests=2, max_ongoing_requests=1)
def busy(request: Request) -> str:
    """Records that it ran, then holds the replica for ?s= seconds."""
    tag = request.query_params["tag"]
    record_execution(tag)
    time.sleep(float(request.query_params.get("s", "0")))
    return tag


busy_app = busy.bind()
deadline_app = busy.options(name="deadline", max_queued_requests=-1, request_timeout_s=1.0).bind()


# --- load: 10 ms of async work per request -------------------------------------------------------------


@deployment(max_ongoing_requests=1000)
async def load(request: Request) -> str:
    await asyncio.sleep(0.01)
    return request.query_params["i"]


load_app = load.bind()


# --- a deployment that cannot start ---------------------------------------------------------------------


@deployment
class BrokenModel:
    def __init__(self) -> None:
        raise RuntimeError("model file missing")


broken_app = BrokenModel.bind()
