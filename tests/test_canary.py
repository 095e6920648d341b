"""Canary / weighted traffic: two versions of an application on one route, the split changed while requests
flow, with no failed request and each phase's observed split within a few percent of its weights."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import celery_serve as serve
from celery_serve._wire.traffic import WeightedChooser
from tests.conftest import Served, wait_until
from tests.served_apps import served_apps


def test_smooth_weighted_round_robin_follows_the_weights_exactly_and_interleaves() -> None:
    chooser = WeightedChooser({"v1": 90, "v2": 10, "off": 0})
    picks = [chooser.pick() for _ in range(100)]
    assert picks.count("v1") == 90 and picks.count("v2") == 10 and "off" not in picks
    assert "v2" in picks[:10]  # interleaved, not a block of 90 then 10
    assert WeightedChooser({}).pick() is None


@pytest.fixture(scope="module")
def versions(served: Served) -> Iterator[dict[str, Any]]:
    from tests import canary_deployments as ex

    try:
        # one after the other: the first on the prefix is the incumbent, which a parallel start leaves to chance
        with (
            served_apps(served, {"canary-v1": (ex.v1, "/canary")}) as v1,
            served_apps(served, {"canary-v2": (ex.v2, "/canary")}) as v2,
        ):
            yield {**v1, **v2}
    finally:
        serve.set_traffic("/canary", None)


def test_set_traffic_refuses_what_it_cannot_route(versions: dict[str, Any]) -> None:
    with pytest.raises(serve.DeploymentNotFoundError, match="no application named 'v3'"):
        serve.set_traffic("/canary", {"canary-v1": 1, "v3": 1})
    with pytest.raises(serve.DeploymentConfigError, match="serves /probe, not /canary"):
        serve.set_traffic("/canary", {"canary-v1": 1, "probe": 1})
    with pytest.raises(serve.DeploymentConfigError, match="must be a number >= 0"):
        serve.set_traffic("/canary", {"canary-v1": -1})
    with pytest.raises(serve.DeploymentConfigError, match="must not all be 0"):
        serve.set_traffic("/canary", {"canary-v1": 0})


def test_weights_change_under_load_with_no_failed_request(versions: dict[str, Any], served: Served) -> None:
    # a new version deployed beside the incumbent takes nothing until a split gives it some
    with served.http() as client:
        assert client.get("/-/traffic").json()["/canary"] == {"canary-v1": 1.0, "canary-v2": 0.0}
        assert {client.get("/canary").json()["version"] for _ in range(20)} == {"v1"}

    log: list[tuple[float, int, str]] = []
    stop = threading.Event()

    def hammer() -> None:
        with httpx.Client(base_url=served.gateway_url, timeout=30) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    resp = http.get("/canary")
                    version = resp.json().get("version", "") if resp.status_code == 200 else resp.text
                    log.append((started, resp.status_code, version))
                except httpx.HTTPError as exc:
                    log.append((started, 0, repr(exc)))

    threads = [threading.Thread(target=hammer, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    phases: list[tuple[float, float, float]] = []  # (start, end, expected share of v2)
    try:
        for weights, share in (
            ({"canary-v1": 90, "canary-v2": 10}, 0.10),
            ({"canary-v1": 1, "canary-v2": 1}, 0.50),
            ({"canary-v1": 3, "canary-v2": 1}, 0.25),  # and back: a rollback is the same call
        ):
            serve.set_traffic("/canary", weights)
            with served.http() as client:
                wait_until(
                    lambda w=weights: (
                        client.get("/-/traffic").json()["/canary"].get("canary-v2", 0.0)
                        == pytest.approx(w.get("canary-v2", 0) / sum(w.values()))
                    ),
                    what="the gateway to follow the new weights",
                )
            start = time.monotonic()  # only requests sent from now on count for this phase
            wait_until(
                lambda s=start: sum(1 for t, _, _ in list(log) if t >= s) >= 200,
                timeout_s=60,
                interval_s=0.05,
                what="200 requests under the new weights",
            )
            phases.append((start, time.monotonic(), share))
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)

    failed = [entry for entry in log if entry[1] != 200]
    assert not failed, f"{len(failed)} of {len(log)} requests failed, e.g. {failed[:3]}"
    for start, end, share in phases:
        versions_seen = [v for t, _, v in log if start <= t < end]
        assert len(versions_seen) >= 40, f"too few requests in a phase to measure the split ({len(versions_seen)})"
        observed = versions_seen.count("v2") / len(versions_seen)
        assert abs(observed - share) <= 0.03, f"v2 got {observed:.1%} of {len(versions_seen)}, weights say {share:.0%}"


def test_the_traffic_command_shows_sets_and_refuses_saying_why(versions: dict[str, Any], served: Served) -> None:
    import subprocess
    import sys

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "celery_serve", "traffic", *args, "--redis-url", served.redis_url],
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = cli("/canary", "canary-v1=3", "canary-v2=1")
    assert done.returncode == 0, done.stderr
    assert "canary-v1 75.0%, canary-v2 25.0%" in done.stdout
    assert "'canary-v1': 3.0, 'canary-v2': 1.0" in cli("/canary").stdout
    bad = cli("/canary", "canary-v1")
    assert bad.returncode != 0 and "APP=WEIGHT" in bad.stderr
    missing = cli("/canary", "nope=1")
    assert missing.returncode != 0 and "no application named 'nope'" in missing.stderr
    assert cli("/canary", "--clear").returncode == 0
    assert "no traffic split on /canary" in cli("/canary").stdout
