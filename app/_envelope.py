"""The request envelope: a Celery task message (protocol 2) in kombu's Redis-transport JSON framing.

One builder serves the gateway, handles and the Python client, so every request looks the same on the
queue and any Celery client (`app.send_task(name, args, queue=...)`) can call a deployment too. Only JSON
is accepted: a message in any other content type (pickle above all) is refused, never decoded.

Our additions ride in headers Celery passes through untouched: `serve_http` (the HTTP request for an
ingress call). The deadline is Celery's own `expires` header.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from app import _keys
from app.exceptions import BadRequestError

_ORIGIN = f"{os.getpid()}@{socket.gethostname()}"
DEFAULT_RETENTION_S = 24 * 3600  # for messages from plain Celery clients, which carry no retention
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def new_task_id() -> str:
    return str(uuid.uuid4())


@dataclass(slots=True)
class Envelope:
    """A decoded request, as a replica sees it."""

    task_id: str
    task_name: str
    method: str
    args: list[Any]
    kwargs: dict[str, Any]
    deadline: float | None
    reply_to: str | None
    http: dict[str, Any] | None
    embed: dict[str, Any]
    headers: dict[str, Any]
    retention_s: int = DEFAULT_RETENTION_S


def build_message(
    *,
    task_id: str,
    app: str,
    deployment: str,
    method: str,
    args: list[Any] | tuple[Any, ...] = (),
    kwargs: dict[str, Any] | None = None,
    deadline: float | None = None,
    reply_to: str | None = None,
    http: dict[str, Any] | None = None,
    retention_s: int = DEFAULT_RETENTION_S,
) -> str:
    """Encode one request as the JSON string kombu's Redis transport keeps on the queue."""
    queue = _keys.queue(app, deployment)
    kwargs = kwargs or {}
    try:
        body = json.dumps([list(args), kwargs, _EMBED], separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise BadRequestError(
            f"arguments for {deployment}.{method} must be JSON-serializable (celery-serve sends JSON only): {exc}"
        ) from None
    headers = {
        "lang": "py",
        "task": _keys.task_name(app, deployment, method),
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": datetime.fromtimestamp(deadline, UTC).isoformat() if deadline else None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "" if http else _short_repr(args),
        "kwargsrepr": "" if http else _short_repr(kwargs),
        "origin": _ORIGIN,
        "ignore_result": False,
        "stamped_headers": None,
        "stamps": {},
        "serve_retention_s": retention_s,
    }
    if http is not None:
        headers["serve_http"] = http
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": reply_to,
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": task_id,
        },
    }
    return json.dumps(message, separators=(",", ":"))


def parse_message(raw: bytes | str) -> Envelope:
    """Decode a queued message; raises `BadRequestError` for anything that is not a JSON task message."""
    try:
        message = json.loads(raw)
        content_type = message.get("content-type")
        if content_type != "application/json":
            raise BadRequestError(f"refusing a message in content type {content_type!r}: only JSON is accepted")
        props = message.get("properties") or {}
        body = message["body"]
        if props.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, embed = json.loads(body)
        headers = message["headers"]
        task_name = headers["task"]
        expires = headers.get("expires")
        return Envelope(
            task_id=headers["id"],
            task_name=task_name,
            method=task_name.rsplit(".", 1)[-1],
            args=list(args),
            kwargs=dict(kwargs),
            deadline=datetime.fromisoformat(expires).timestamp() if expires else None,
            reply_to=props.get("reply_to"),
            http=headers.get("serve_http"),
            embed=embed or {},
            headers=headers,
            retention_s=int(headers.get("serve_retention_s") or DEFAULT_RETENTION_S),
        )
    except BadRequestError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadRequestError(f"malformed task message: {type(exc).__name__}: {exc}") from None


def _short_repr(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
