"""Applications whose run stopped a moment ago: their requests get 503 (retry), not 404 (no such thing).

A run that stops (`celery-serve shutdown`, Ctrl-C, one of its processes exiting) removes its applications'
specs, so that no gateway routes to replicas that are going away. Without more, a request in that window, or
shortly after it, is answered 404 "no application serves /x": a client error, which load balancers and
retrying clients give up on, during what is often a restart. So the run leaves a note per application in
`keys.STOPPED` (when it stopped, its route prefix and deployments), written in the same script that removes
the spec. For `STOPPED_FOR_S` after that, gateways, handles and the client answer `ApplicationStoppedError`
(503 with Retry-After). Deploying the name again removes the note; so does `serve.delete` (or `celery-serve
delete`), which also ends the requests still queued for it, as for a deployed application. A note past its
time is ignored.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from celery_serve.exceptions import ApplicationStoppedError

STOPPED_FOR_S = 300.0
RETRY_AFTER_S = 5
RETRY_AFTER = (b"retry-after", str(RETRY_AFTER_S).encode())  # the HTTP header that goes with the 503


@dataclass(frozen=True)
class Stopped:
    """One application's note: when its run stopped it, and what it served."""

    app: str
    at: float
    route_prefix: str
    deployments: tuple[str, ...]
    queues: tuple[str, ...] = ()  # what `serve.delete` empties when it removes the application for good

    @property
    def recent(self) -> bool:
        return time.time() - self.at < STOPPED_FOR_S

    def error(self) -> ApplicationStoppedError:
        ago = max(time.time() - self.at, 0.0)
        return ApplicationStoppedError(
            f"application '{self.app}' is not served now: its run stopped {ago:.0f} s ago (celery-serve "
            "shutdown, Ctrl-C, or one of its processes exited) and nothing else serves it; retry once it runs "
            "again (serve.delete removes it for good)"
        )


def note(route_prefix: str, deployments: Iterable[str], queues: Iterable[str]) -> str:
    """The JSON a stopping run leaves for one of its applications."""
    return json.dumps(
        {"at": time.time(), "route_prefix": route_prefix, "deployments": sorted(deployments), "queues": sorted(queues)}
    )


def parse(app: Any, raw: Any) -> Stopped | None:
    """A note read from Redis; None when unreadable."""
    try:
        data = json.loads(raw)
        name = app.decode() if isinstance(app, bytes) else str(app)
        prefix, deployments = str(data.get("route_prefix") or ""), tuple(data.get("deployments") or ())
        return Stopped(name, float(data["at"]), prefix, deployments, tuple(data.get("queues") or ()))
    except (ValueError, TypeError, KeyError):
        return None


def recent(raw: dict[Any, Any]) -> list[Stopped]:
    """The notes of `HGETALL keys.STOPPED` still within `STOPPED_FOR_S`."""
    found = (parse(app, value) for app, value in raw.items())
    return [entry for entry in found if entry is not None and entry.recent]


def for_deployment(notes: list[Stopped], name: str, app: str | None = None) -> Stopped | None:
    """The stopped application that had a deployment (or was a pipeline) named `name`."""
    return next(
        (e for e in notes if app in (None, e.app) and (name in e.deployments or name == e.app)),
        None,
    )
