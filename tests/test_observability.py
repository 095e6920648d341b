"""Watching deployments: Flower's HTTP API, the gateway's Prometheus /metrics, `celery-serve status`.

Real parts: the session's gateway and scaler, a deployment of our own, Flower started as `celery-serve
run` starts it, and the `celery-serve` command in a subprocess.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from celery_serve import run
from celery_serve._runtime import serve as _serve
from celery_serve._runtime.launcher import child_env
from tests import scaling_deployments as sd
from tests.conftest import Served, wait_until

pytestmark = pytest.mark.timeout(180)

AUTH = ("flower", "s3cret")


@pytest.fixture(scope="module")
def watched(served: Served) -> Iterator[dict[str, Any]]:
    """The Watched deployment, plus some traffic: HTTP successes and failures, batched handle calls."""
    name = f"watched-{uuid.uuid4().hex[:4]}"
    handle = run(sd.watched_app, name=name, route_prefix=f"/{name}", redis_url=served.redis_url, startup_timeout_s=150)
    try:
        yield {"name": name, "handle": handle, "queue": f"serve.{name}.Watched", "prefix": f"/{name}"}
    finally:
        _serve.delete(name)


def traffic(served: Served, watched: dict[str, Any], ok: int = 5, failed: int = 2) -> None:
    with served.http() as http:
        for _ in range(ok):
            assert http.get(watched["prefix"]).status_code == 200
        for _ in range(failed):
            assert http.get(watched["prefix"], params={"fail": "1"}).status_code == 500
    doubled = [watched["handle"].double.remote(i) for i in range(16)]
    assert [r.result(timeout_s=30) for r in doubled] == [2 * i for i in range(16)]


# --- Flower ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flower(watched: dict[str, Any]) -> Iterator[str]:
    url = _serve.start_flower(port=None, basic_auth=":".join(AUTH))
    with httpx.Client(base_url=url, timeout=10) as client:
        wait_until(lambda: _answers(client), timeout_s=60, interval_s=0.2, what="Flower to answer")
    try:
        yield url
    finally:
        session = _serve._session
        if session is not None:
            session.group.stop({"flower"})
            session.flower_url = None


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/healthcheck").status_code == 200
    except httpx.HTTPError:
        return False


def test_flower_needs_the_configured_basic_auth(flower: str) -> None:
    assert httpx.get(f"{flower}/api/workers", timeout=10).status_code == 401
    assert httpx.get(f"{flower}/api/workers", auth=("flower", "wrong"), timeout=10).status_code == 401
    assert flower.startswith("http://127.0.0.1:")  # loopback unless told otherwise


def test_flower_lists_the_deployment_worker_and_its_queue(flower: str, watched: dict[str, Any]) -> None:
    prefix = f"{watched['name']}.Watched."

    def our_worker() -> dict[str, Any] | None:
        workers = httpx.get(f"{flower}/api/workers", params={"refresh": "1"}, auth=AUTH, timeout=20).json()
        return next((info for host, info in workers.items() if host.startswith(prefix)), None)

    info = wait_until(our_worker, timeout_s=60, interval_s=0.5, what="Flower to list the worker")
    assert watched["queue"] in [q["name"] for q in info["active_queues"]]
    lengths = httpx.get(f"{flower}/api/queues/length", auth=AUTH, timeout=20).json()
    assert watched["queue"] in [q["name"] for q in lengths["active_queues"]]


def test_flower_shows_requests_as_tasks_named_by_deployment_and_method(
    served: Served, flower: str, watched: dict[str, Any]
) -> None:
    name = watched["name"]

    def tasks_seen() -> dict[str, set[str]]:
        traffic(served, watched, ok=2, failed=1)  # replicas send events once Flower has asked for them
        tasks = httpx.get(f"{flower}/api/tasks", params={"limit": "1000"}, auth=AUTH, timeout=20).json()
        seen: dict[str, set[str]] = {}
        for task in tasks.values():
            # a task Flower has seen only a late event of has no name or worker yet
            task_name, worker = task.get("name") or "", task.get("worker") or ""
            if task_name.startswith(f"{name}.Watched.") and worker.startswith(f"{name}.Watched."):
                seen.setdefault(task["name"], set()).add(task["state"])
        wanted = {f"{name}.Watched.__call__": "SUCCESS", f"{name}.Watched.double": "SUCCESS"}
        if all(state in seen.get(task, set()) for task, state in wanted.items()) and "FAILURE" in seen.get(
            f"{name}.Watched.__call__", set()
        ):
            return seen
        return {}

    wait_until(tasks_seen, timeout_s=60, interval_s=0.5, what="Flower to show the requests as tasks")
    tasks = httpx.get(f"{flower}/api/tasks", params={"limit": "1000", "state": "SUCCESS"}, auth=AUTH, timeout=20).json()
    task = next(t for t in tasks.values() if t["name"] == f"{name}.Watched.double")
    assert task["runtime"] is not None and task["received"] and task["started"]
    assert task["args"].startswith("[")


# --- Prometheus --------------------------------------------------------------------------------------


def scrape(served: Served) -> dict[str, list[Any]]:
    """Metric family name -> its samples."""
    text = httpx.get(f"{served.gateway_url}/metrics", timeout=10).text
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def labelled(samples: list[Any], name: str, **labels: str) -> list[Any]:
    return [s for s in samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def test_metrics_carry_requests_latency_queue_in_flight_batches_and_replicas(
    served: Served, watched: dict[str, Any]
) -> None:
    traffic(served, watched, ok=5, failed=2)
    ours = {"application": watched["name"], "deployment": "Watched"}

    def replica_counts_arrived() -> dict[str, list[Any]] | None:
        families = scrape(served)
        answered = labelled(families.get("serve_replica_requests", []), "serve_replica_requests_total", **ours)
        return families if answered and answered[0].value >= 7 + 16 else None

    families = wait_until(replica_counts_arrived, timeout_s=30, interval_s=0.2, what="replica counts in /metrics")
    requests = families["serve_requests"]
    assert labelled(requests, "serve_requests_total", status="200", **ours)[0].value >= 5
    assert labelled(requests, "serve_requests_total", status="500", **ours)[0].value >= 2
    latency = families["serve_request_latency_seconds"]
    assert labelled(latency, "serve_request_latency_seconds_count", **ours)[0].value >= 7
    assert labelled(latency, "serve_request_latency_seconds_bucket", le="+Inf", **ours)
    for family, sample in [
        ("serve_queue_depth", "serve_queue_depth"),
        ("serve_in_flight_requests", "serve_in_flight_requests"),
        ("serve_replicas_ready", "serve_replicas_ready"),
    ]:
        assert labelled(families[family], sample, **ours), family
    assert labelled(families["serve_replicas"], "serve_replicas", **ours)[0].value == 1
    assert labelled(families["serve_replicas_desired"], "serve_replicas_desired", **ours)[0].value == 1
    assert labelled(families["serve_replica_errors"], "serve_replica_errors_total", **ours)[0].value >= 2
    batches = families["serve_batch_size"]
    assert labelled(batches, "serve_batch_size_count", **ours)[0].value >= 1
    largest = labelled(batches, "serve_batch_size_bucket", le="+Inf", **ours)[0].value
    single = labelled(batches, "serve_batch_size_bucket", le="1.0", **ours)[0].value
    assert largest > single  # the 16 concurrent double() calls ran in batches of more than one


# --- celery-serve status -----------------------------------------------------------------------------


def celery_serve(served: Served, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "celery_serve", *args, "--redis-url", served.redis_url],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_status_json_and_table(served: Served, watched: dict[str, Any]) -> None:
    traffic(served, watched, ok=3, failed=1)

    def ours() -> dict[str, Any] | None:
        data = json.loads(celery_serve(served, "status", "--json"))
        found = [d for d in data["deployments"] if d["app"] == watched["name"]]
        entry = found[0] if found else None
        return entry if entry and entry["requests"] >= 4 and entry["throughput_rps"] is not None else None

    entry = wait_until(ours, timeout_s=30, interval_s=0.5, what="status to show the requests")
    assert entry["deployment"] == "Watched"
    assert (entry["replicas"], entry["desired"], entry["ready"]) == (1, 1, 1)
    assert entry["autoscaling"] is None and entry["queue"] == watched["queue"]
    assert entry["errors"] >= 1 and entry["throughput_rps"] >= 0 and entry["in_flight"] >= 0 and entry["queued"] >= 0
    assert len(entry["workers"]) == 1
    table = celery_serve(served, "status")
    assert f"{watched['name']}: RUNNING" in table.splitlines()  # Ray's statuses come first, then the table
    header = next(line for line in table.splitlines() if line.startswith("APP ")).split()
    assert header[:3] == ["APP", "DEPLOYMENT", "REPLICAS"]
    row = next(line.split() for line in table.splitlines() if line.startswith(watched["name"] + " "))
    assert row[1:5] == ["Watched", "1/1", "1", "fixed"]
