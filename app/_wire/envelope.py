"""The request envelope: a Celery task message (protocol 2) in kombu's Redis-transport JSON framing.

One builder serves the gateway, handles and the Python client, so every request looks the same on the
queue and any Celery client (`app.send_task(name, args, queue=...)`) can call a deployment too. Only JSON
is accepted: a message in any other content type (pickle above all) is refused, never decoded.

Our additions ride in headers Celery passes through untouched: `serve_http` (the HTTP request for an
ingress call). The deadline is Celery's own `expires` header.
"""

from __future__ import annotations

import base64
import os
import socket
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from celery_serve._wire import keys as _keys
from celery_serve._wire import strictjson
from celery_serve._wire.affinity import MODEL_ID_HEADER
from celery_serve.exceptions import BadRequestError

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
    job_id: str = ""  # the id the caller waits on: this task's id, or a pipeline's job id
    http_reply: bool = False  # answer with an HTTP response (the pipeline was called over HTTP)
    chord: dict[str, Any] | None = None  # for one branch of a parallel step: {"key", "index", "size"}
    model_id: str = ""  # the multiplexed model the caller asked for (serve_multiplexed_model_id)
    stream: str = ""  # "require": the caller iterates a stream; "allow": a stream or a value; "": a value
    deliveries: int = 0  # how many times a replica died holding this message (see `_wire.delivery`)

    @property
    def in_pipeline(self) -> bool:
        return bool(self.embed.get("chain")) or self.chord is not None or self.job_id != self.task_id

    @property
    def chain(self) -> list[dict[str, Any]]:
        """The pipeline stages still to run after this one, the next one last (Celery's convention)."""
        return list(self.embed.get("chain") or [])


def signature(task_id: str, app: str, deployment: str, queue: str, method: str = "__call__") -> dict[str, Any]:
    """One pipeline step, as a Celery signature (plus where it runs)."""
    return {
        "task": _keys.task_name(app, deployment, method),
        "args": [],
        "kwargs": {},
        "options": {"task_id": task_id, "queue": queue},
        "subtask_type": None,
        "immutable": False,
        "serve": {"app": app, "deployment": deployment, "method": method},
    }


def parallel_signature(group_id: str, steps: list[dict[str, Any]]) -> dict[str, Any]:
    """A parallel pipeline step: its branches' signatures; the next stage gets their results as a list."""
    return {"subtask_type": "serve_parallel", "tasks": steps, "options": {"group_id": group_id}}


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
    job_id: str | None = None,
    chain: list[dict[str, Any]] | None = None,
    chord: dict[str, Any] | None = None,
    http_reply: bool = False,
    queue: str | None = None,
    model_id: str = "",
    stream: str | None = None,
    job_elsewhere: bool = False,
) -> str:
    """Encode one request as the JSON string kombu's Redis transport keeps on the queue.

    `job_elsewhere`: the job's keys are in another Redis Cluster slot than this task's (a pipeline's later
    step on a cluster). The scripts that take and bury messages look a message's job up by its `serve_job`
    header and may only touch their own slot, so that header then names the task itself and
    `serve_chain_job` the job."""
    queue = queue or _keys.queue(app, deployment)
    kwargs = kwargs or {}
    embed = _EMBED if not chain else {**_EMBED, "chain": chain}
    try:
        body = strictjson.dumps([list(args), kwargs, embed])  # wide integers kept, NaN refused
    except (TypeError, ValueError) as exc:
        raise BadRequestError(
            f"arguments for {deployment}.{method} must be JSON-serializable (celery-serve sends JSON only): {exc}"
        ) from None
    headers: dict[str, Any] = {
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
        "serve_job": job_id or task_id,
    }
    if job_elsewhere and job_id and job_id != task_id:
        headers["serve_job"], headers["serve_chain_job"] = task_id, job_id
    if chord is not None:
        headers["serve_chord"] = chord
    if http_reply:
        headers["serve_http_reply"] = True
    if http is not None:
        headers["serve_http"] = http
    if model_id:
        headers[MODEL_ID_HEADER] = model_id
    if stream:
        headers["serve_stream"] = stream
    message = {
        "body": base64.b64encode(body).decode(),
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
    return orjson.dumps(message).decode()


SUSPECT_MARK = b'"serve_deliveries"'  # in a message a replica died holding (found without decoding it)


def parse_message(raw: bytes | str) -> Envelope:
    """Decode a queued message; raises `BadRequestError` for anything that is not a JSON task message."""
    try:
        message = orjson.loads(raw)
        content_type = message.get("content-type")
        if content_type != "application/json":
            raise BadRequestError(f"refusing a message in content type {content_type!r}: only JSON is accepted")
        props = message.get("properties") or {}
        body = message["body"]
        if props.get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args, kwargs, embed = strictjson.loads(body)
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
            job_id=headers.get("serve_chain_job") or headers.get("serve_job") or headers["id"],
            http_reply=bool(headers.get("serve_http_reply") or headers.get("serve_http")),
            chord=headers.get("serve_chord"),
            model_id=str(headers.get(MODEL_ID_HEADER) or ""),
            stream=str(headers.get("serve_stream") or ""),
            deliveries=int(headers.get("serve_deliveries") or 0),
        )
    except BadRequestError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BadRequestError(f"malformed task message: {type(exc).__name__}: {exc}") from None


def _short_repr(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
