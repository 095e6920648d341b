"""The note a stopping run leaves (`_wire.stopped_apps`): which requests it answers 503 for, and for how long."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from celery_serve import ApplicationStoppedError, ServiceUnavailableError
from celery_serve._wire import stopped_apps
from celery_serve.api.routes import RouteTable


def entry(prefix: str, deployments: list[str], ago_s: float = 1.0) -> str:
    return json.dumps({"at": time.time() - ago_s, "route_prefix": prefix, "deployments": deployments})


def stopped_for(raw: dict[Any, str], path: str) -> stopped_apps.Stopped | None:
    """What a gateway's route table answers for `path`, given the notes in Redis."""
    table = RouteTable(client=None)  # type: ignore[arg-type]  # no Redis: the notes are set as a refresh does
    table.stopped = stopped_apps.recent(raw)
    return table.stopped_for(path)


def test_a_path_finds_the_stopped_application_whose_prefix_serves_it_longest_first() -> None:
    raw = {b"root": entry("/", ["A"]), b"shop": entry("/shop", ["Cart"])}
    assert stopped_for(raw, "/shop/cart").app == "shop"  # type: ignore[union-attr]
    assert stopped_for(raw, "/shopping").app == "root"  # type: ignore[union-attr]
    assert stopped_for({b"shop": entry("/shop", [])}, "/shopping") is None


def test_a_deployment_name_finds_its_stopped_application_unless_another_is_named() -> None:
    notes = stopped_apps.recent({"shop": entry("/shop", ["Cart"])})
    assert stopped_apps.for_deployment(notes, "Cart") is not None
    assert stopped_apps.for_deployment(notes, "Cart", app="other") is None
    assert stopped_apps.for_deployment(notes, "Till") is None


def test_an_old_or_unreadable_note_is_ignored() -> None:
    raw = {"old": entry("/old", ["A"], ago_s=stopped_apps.STOPPED_FOR_S + 1), "bad": "{not json", "none": "{}"}
    assert stopped_apps.recent(raw) == []


def test_the_error_is_a_503_that_says_to_retry() -> None:
    (note,) = stopped_apps.recent({"shop": stopped_apps.note("/shop", ["Cart"], ["serve.shop.Cart"])})
    error = note.error()
    assert isinstance(error, ServiceUnavailableError) and error.http_status == 503
    assert note.queues == ("serve.shop.Cart",)
    with pytest.raises(ApplicationStoppedError, match="application 'shop' is not served now: its run stopped"):
        raise error
