"""Deployments the safety tests (tests/test_strict_json.py, tests/test_request_ids.py) serve.

At module level so worker processes import them by module path, as they would a user's module.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from starlette.middleware import Middleware
from starlette.requests import Request

from celery_serve import deployment, ingress


@deployment(name="strict_echo")
class StrictEcho:
    """Echoes the JSON it got; `{"sleep": s}` answers after s seconds, `{"float": "nan"}` returns that float."""

    async def __call__(self, request: Request) -> Any:
        data = await request.json()
        if isinstance(data, dict) and "sleep" in data:
            await asyncio.sleep(float(data["sleep"]))
            return {"slept": data["sleep"]}
        if isinstance(data, dict) and "float" in data:
            return {"score": float(data["float"])}
        return data

    def echo(self, value: Any) -> Any:
        return value

    def non_finite(self, text: str) -> Any:
        return [1.0, {"score": float(text)}]


strict_api = FastAPI()


class Item(BaseModel):
    name: str
    count: int


@deployment(name="strict_ingress")
@ingress(strict_api)
class StrictIngress:
    @strict_api.post("/item")
    def item(self, item: Item) -> dict[str, Any]:
        return {"name": item.name, "count": item.count}


echo_app = StrictEcho.bind()
ingress_app = StrictIngress.bind()


class StampMiddleware:
    """A pure ASGI middleware for the gateway tests: stamps every HTTP response with `x-stamp: <value>`."""

    def __init__(self, app: Any, value: str = "yes") -> None:
        self.app = app
        self.value = value.encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def stamped(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (b"x-stamp", self.value)]}
            await send(message)

        await self.app(scope, receive, stamped)


GATEWAY_MIDDLEWARES = [Middleware(StampMiddleware, value="by-path")]
