"""HTTP inside the replica: the Starlette `Request` rebuilt from the envelope, and responses encoded back.

The gateway ships the request (method, path, query, headers, body) in the envelope; here it becomes a real
`starlette.requests.Request`, so user code reads it exactly as under Ray Serve. Whatever the user returns
is turned into the response the gateway will send: `str` as text, a Starlette `Response` as it is, anything
else as JSON.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import parse_qsl

from starlette.datastructures import FormData, UploadFile
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message

from celery_serve._wire import strictjson
from celery_serve.exceptions import BadRequestError

_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


class ServeRequest(Request):
    """A Starlette `Request` whose body is already in memory.

    `await request.json()`, `.body()` and `.form()` work as usual; synchronous code (function deployments,
    sync methods) can use `json_sync()`, `body_sync()` and `form_sync()`, and `query_params` as always.
    Malformed JSON raises `BadRequestError`, which the gateway answers with 400.
    """

    def __init__(self, scope: dict[str, Any], body: bytes) -> None:
        super().__init__(scope, _receive_once(body))
        self._body = body

    async def json(self) -> Any:
        return self.json_sync()

    def body_sync(self) -> bytes:
        return self._body

    def json_sync(self) -> Any:
        if not hasattr(self, "_json"):
            try:
                self._json = strictjson.loads(self._body)
            except strictjson.NotJSONError as exc:
                raise BadRequestError(f"request body is not valid JSON: {exc}") from None
        return self._json

    def form_sync(self) -> FormData:
        """The form, for sync code; multipart forms are parsed before sync code runs."""
        if getattr(self, "_form", None) is not None:
            return self._form  # type: ignore[return-value]
        if self.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            pairs: list[tuple[str, str | UploadFile]] = list(
                parse_qsl(self._body.decode("latin-1"), keep_blank_values=True)
            )
            self._form = FormData(pairs)
            return self._form
        raise BadRequestError("the request has no form body (content type is not a form)")

    @property
    def is_form(self) -> bool:
        return self.headers.get("content-type", "").startswith(_FORM_TYPES)


def _receive_once(body: bytes) -> Any:
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def build_scope(http: dict[str, Any], *, root_path: str = "") -> dict[str, Any]:
    path = http["path"]
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": http.get("http_version", "1.1"),
        "method": http["method"],
        "scheme": http.get("scheme", "http"),
        "path": path,
        "raw_path": path.encode("utf-8"),
        "root_path": root_path,
        "query_string": http.get("query_string", "").encode("latin-1"),
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in http.get("headers", [])],
        "client": tuple(http["client"]) if http.get("client") else None,
        "server": tuple(http["server"]) if http.get("server") else None,
        "state": {},
    }


def body_of(http: dict[str, Any]) -> bytes:
    body = http.get("body") or ""
    return base64.b64decode(body) if body else b""


def build_request(http: dict[str, Any]) -> ServeRequest:
    return ServeRequest(build_scope(http), body_of(http))


def encode_body(body: bytes) -> tuple[str, str]:
    try:
        return body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), "base64"


def response_dict(status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> dict[str, Any]:
    text, encoding = encode_body(body)
    return {
        "status_code": status,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers],
        "body": text,
        "body_encoding": encoding,
    }


async def run_asgi(app: ASGIApp, scope: dict[str, Any], body: bytes) -> dict[str, Any]:
    """Run one request through an ASGI app (a FastAPI ingress or a returned Response) and capture it."""
    status = 500
    headers: list[tuple[bytes, bytes]] = []
    chunks: list[bytes] = []

    async def send(message: Message) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status = message["status"]
            headers = list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, _receive_once(body), send)
    return response_dict(status, headers, b"".join(chunks))


def _json_bytes(value: Any) -> bytes:
    """JSON for a returned value; `strictjson.NotJSONError` for NaN or an infinity (never a silent null)."""
    try:
        return strictjson.dumps(value)
    except strictjson.NotJSONError:
        raise
    except (TypeError, ValueError):
        return strictjson.dumps(to_jsonable(value))


_TEXT = [(b"content-type", b"text/plain; charset=utf-8")]
_JSON = [(b"content-type", b"application/json")]
_BINARY = [(b"content-type", b"application/octet-stream")]


async def encode_result(value: Any, scope: dict[str, Any]) -> dict[str, Any]:
    """The HTTP response for a value returned by user code."""
    if isinstance(value, Response):
        return await run_asgi(value, scope, b"")
    if isinstance(value, str):
        return response_dict(200, _TEXT, value.encode("utf-8"))
    if isinstance(value, (bytes, bytearray)):
        return response_dict(200, _BINARY, bytes(value))
    return response_dict(200, _JSON, _json_bytes(value))


def to_jsonable(value: Any) -> Any:
    """A handle call's return value as plain JSON data (pydantic models, dataclasses, datetimes...)."""
    if value is None or isinstance(value, (str, int, bool)):
        return value
    try:
        strictjson.dumps(value)
        return value
    except strictjson.NotJSONError:
        raise
    except (TypeError, ValueError):
        if type(value).__module__.partition(".")[0] in ("torch", "numpy") and hasattr(value, "tolist"):
            return value.tolist()  # a tensor (e.g. one row of a batch's output) as nested lists or a number
        from fastapi.encoders import jsonable_encoder

        return jsonable_encoder(value)
