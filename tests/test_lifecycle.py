"""Operating deployments as Ray Serve users do, with real Redis, workers and HTTP: health checks that replace
a broken replica, DEPLOY_FAILED after repeated constructor failures, `user_config` changes taken in place,
rolling updates under load, graceful shutdown, `serve.status()`, `serve.delete()` and `get_app_handle()`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

import celery_serve as serve
from celery_serve import DeploymentNotFoundError
from celery_serve._runtime import serve as _serve
from celery_serve._runtime.launcher import free_port
from celery_serve.schema import ApplicationStatus, DeploymentStatus
from tests import lifecycle_deployments as ld
from tests.conftest import Served, wait_until
from tests.test_examples import READY_LINE, CliProcess


@pytest.fixture(scope="module")
def service(redis_url: str) -> Iterator[Served]:
    """The service of this test session; started here (without the shared test applications, and stopped
    after this module) when none runs yet."""
    own = _serve._session is None
    if own:
        serve.start(http_options={"port": free_port()}, redis_url=redis_url)
    session = _serve._session
    assert session is not None and session.gateway_url is not None
    gateway = next(p for p in session.group.processes if p.name == "gateway")
    yield Served(session.redis_url, session.gateway_url, gateway.proc.pid, {})
    if own:
        serve.shutdown()


@pytest.fixture
def deploy(service: Served) -> Iterator[Callable[..., str]]:
    """Run an application in the session's service under a fresh name; deleted afterwards."""
    names: list[str] = []

    def start(application: Any, prefix: str, name: str | None = None) -> str:
        name = name or f"{prefix}-{uuid.uuid4().hex[:4]}"
        if name not in names:
            names.append(name)
        serve.run(application, name=name, route_prefix=f"/{name}", redis_url=service.redis_url, startup_timeout_s=150)
        return name

    yield start
    for name in names:
        try:
            serve.delete(name)
        except DeploymentNotFoundError:
            pass


def redis_client_of(service: Served) -> Any:
    import redis

    return redis.Redis.from_url(service.redis_url)


def app_status(name: str) -> Any:
    return serve.status().applications.get(name)


def test_a_replica_whose_health_check_fails_is_replaced_and_its_work_handed_back(
    service: Served, deploy: Callable[..., str], redis_client: Any
) -> None:
    name = deploy(ld.health_app, "health")
    http = service.http()
    first = http.get(f"/{name}").json()["pid"]
    assert app_status(name).status == ApplicationStatus.RUNNING
    # a slow request is running on the replica when its "database connection" breaks
    slow: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: slow.update(r=http.get(f"/{name}", params={"sleep": "2"})))
    thread.start()
    time.sleep(0.3)
    redis_client.set(ld.broken_key("health"), first)
    status = wait_until(
        lambda: (s := app_status(name)) is not None and s.status == ApplicationStatus.UNHEALTHY and s,
        timeout_s=20,
        what="the application to turn UNHEALTHY",
    )
    deployment = status.deployments["MyDeployment"]
    assert deployment.status == DeploymentStatus.UNHEALTHY
    assert "uh-oh, DB connection is broken." in deployment.message
    assert "failed 3 health checks" in deployment.message
    thread.join(timeout=60)
    assert slow["r"].status_code == 200  # handed back, then served by the replacement
    replacement = slow["r"].json()["pid"]
    assert replacement != first
    wait_until(lambda: app_status(name).status == ApplicationStatus.RUNNING, timeout_s=30, what="RUNNING again")
    assert http.get(f"/{name}").json()["pid"] == replacement


def test_a_hanging_health_check_counts_as_failed(
    service: Served, deploy: Callable[..., str], redis_client: Any
) -> None:
    name = deploy(ld.hang_app, "hang")
    handle = serve.get_app_handle(name)
    first = handle.remote().result(timeout_s=30)
    redis_client.set(ld.broken_key("hang"), first)
    status = wait_until(
        lambda: (s := app_status(name)).status == ApplicationStatus.UNHEALTHY and s, timeout_s=20, what="UNHEALTHY"
    )
    assert "did not return within health_check_timeout_s=0.3" in status.deployments["Hangs"].message
    wait_until(lambda: handle.remote().result(timeout_s=30) != first, timeout_s=30, what="a replacement replica")
    wait_until(lambda: app_status(name).status == ApplicationStatus.RUNNING, timeout_s=30, what="RUNNING again")


def test_a_frozen_replica_process_is_killed_and_replaced_by_its_pool(
    service: Served, deploy: Callable[..., str]
) -> None:
    """SIGSTOP freezes the health checker with the replica: the pool, seeing no heartbeat for longer than a
    health check may take, kills it and starts another; the request it held is answered by the replacement."""
    name = deploy(ld.freeze_app, "freeze")
    handle = serve.get_app_handle(name)
    frozen = handle.remote().result(timeout_s=30)
    held = handle.remote(2.0)  # running on the replica when it freezes
    time.sleep(0.5)
    os.kill(frozen, signal.SIGSTOP)
    try:
        status = wait_until(
            lambda: (s := app_status(name)).status == ApplicationStatus.UNHEALTHY and s, timeout_s=40, what="UNHEALTHY"
        )
        assert "sent no heartbeat" in status.deployments["Freezes"].message
        assert held.result(timeout_s=60) != frozen  # handed back, served by the replacement
        wait_until(lambda: not psutil.pid_exists(frozen) or psutil.Process(frozen).status() == "zombie", 30)
        wait_until(lambda: app_status(name).status == ApplicationStatus.RUNNING, timeout_s=40, what="RUNNING again")
        assert handle.remote().result(timeout_s=30) != frozen
    finally:
        if psutil.pid_exists(frozen):
            os.kill(frozen, signal.SIGCONT)


def test_a_failed_update_is_rolled_back_and_the_old_version_serves_throughout(
    service: Served, deploy: Callable[..., str]
) -> None:
    name = deploy(ld.good_app, "rollback")
    failures: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        with service.http() as http:
            while not stop.is_set():
                response = http.get(f"/{name}")
                if response.status_code != 200 or response.json()["version"] != "good":
                    failures.append(response.text)
                time.sleep(0.02)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        time.sleep(0.5)
        with pytest.raises(serve.ServeStartupError, match="the new model does not load.*rolled back"):
            serve.run(ld.broken_update_app, name=name, route_prefix=f"/{name}", startup_timeout_s=150)
        time.sleep(1.0)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert failures == []
    wait_until(lambda: app_status(name).status == ApplicationStatus.RUNNING, timeout_s=60, what="RUNNING")
    with service.http() as http:
        assert http.get(f"/{name}").json()["version"] == "good"


def test_a_constructor_that_keeps_failing_ends_in_deploy_failed_with_its_error(service: Served, tmp_path: Any) -> None:
    name = f"failing-{uuid.uuid4().hex[:4]}"
    env = {**os.environ, "REDIS_URL": service.redis_url, "SERVE_LOG_LEVEL": "CRITICAL"}
    cli = [sys.executable, "-m", "celery_serve"]
    subprocess.run([*cli, "deploy", "tests.lifecycle_deployments:failing_app", "--name", name], env=env, check=True)
    assert app_status(name).status == ApplicationStatus.DEPLOYING
    assert "no worker serves it yet" in app_status(name).deployments["FailingConstructor"].message
    worker = subprocess.Popen(
        [*cli, "worker", "--app-name", name, "--deployment", "FailingConstructor"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        status = wait_until(
            lambda: (s := app_status(name)).status == ApplicationStatus.DEPLOY_FAILED and s,
            timeout_s=60,
            what="DEPLOY_FAILED",
        )
        message = status.deployments["FailingConstructor"].message
        assert "max_constructor_retry_count=2" in message
        assert "FileNotFoundError: model weights not found at /models/missing.bin" in message
        assert "FileNotFoundError" in status.message
        out = subprocess.run([*cli, "status"], env=env, capture_output=True, text=True, check=True).stdout
        assert f"{name}: DEPLOY_FAILED" in out and "model weights not found" in out
        time.sleep(1.5)
        assert app_status(name).deployments["FailingConstructor"].replica_states == {"RUNNING": 0, "STARTING": 0}
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        serve.delete(name)


def test_a_user_config_change_reconfigures_the_running_replicas_in_place(
    service: Served, deploy: Callable[..., str]
) -> None:
    name = deploy(ld.Greeter.bind(), "greet")
    handle = serve.get_app_handle(name)
    before = [handle.remote().result(timeout_s=30) for _ in range(20)]
    assert {r["greeting"] for r in before} == {"hello"}
    pids = {r["pid"] for r in before}
    started = time.monotonic()
    deploy(ld.Greeter.options(user_config={"greeting": "bonjour"}).bind(), "greet", name=name)
    took = time.monotonic() - started
    after = [handle.remote().result(timeout_s=30) for _ in range(20)]
    assert {r["greeting"] for r in after} == {"bonjour"}
    assert {r["pid"] for r in after} <= pids  # the same processes: reconfigured, not restarted
    assert {r["reconfigured"] for r in after} == {2}
    assert took < 30
    # num_replicas is lightweight too: the pool grows; the running replicas stay
    deploy(ld.Greeter.options(user_config={"greeting": "bonjour"}, num_replicas=3).bind(), "greet", name=name)
    grown = wait_until(
        lambda: len(p := {handle.remote().result(timeout_s=30)["pid"] for _ in range(30)}) == 3 and p,
        timeout_s=30,
        what="three replicas",
    )
    assert pids <= grown


def under_load(service: Served, path: str, action: Callable[[], None]) -> tuple[list[str], list[dict[str, Any]]]:
    """Run `action` while four clients send requests to `path` back to back: (failures, answers in order)."""
    failures: list[str] = []
    seen: list[dict[str, Any]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=service.gateway_url, timeout=30) as client:
            while not stop.is_set():
                try:
                    r = client.get(path)
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                    else:
                        seen.append(r.json())
                except httpx.HTTPError as exc:
                    failures.append(repr(exc))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        action()
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    return failures, seen


def test_an_unchanged_version_is_not_restarted_and_new_code_rolls_over_under_load(
    service: Served, deploy: Callable[..., str]
) -> None:
    name = deploy(ld.Versioned.options(version="1").bind("v1"), "roll")
    http = service.http(timeout=30)
    pids_v1 = {http.get(f"/{name}").json()["pid"] for _ in range(20)}
    # the same version with other arguments: Ray does not restart it
    deploy(ld.Versioned.options(version="1").bind("v1-other-args"), "roll", name=name)
    assert {http.get(f"/{name}").json()["pid"] for _ in range(10)} <= pids_v1

    # a new version: the pool rolls its replicas over, one by one
    failures, seen = under_load(
        service, f"/{name}", lambda: deploy(ld.Versioned.options(version="2").bind("v2"), "roll", name=name)
    )
    assert failures == []
    assert len(seen) > 50
    versions = [r["version"] for r in seen]
    assert versions[0] == "v1" and versions[-1] == "v2"
    pids_v2 = {http.get(f"/{name}").json()["pid"] for _ in range(20)}
    assert {http.get(f"/{name}").json()["version"] for _ in range(10)} == {"v2"}
    assert not pids_v2 & pids_v1

    # new resources: a new worker starts, and the old one stops once the new replicas serve
    v3 = ld.Versioned.options(version="3", num_cpus=0.5).bind("v3")
    failures, seen = under_load(service, f"/{name}", lambda: deploy(v3, "roll", name=name))
    assert failures == []
    assert seen[-1]["version"] == "v3"
    assert not {http.get(f"/{name}").json()["pid"] for _ in range(20)} & pids_v2


def test_graceful_shutdown_hands_back_what_outlives_its_timeout(service: Served, deploy: Callable[..., str]) -> None:
    name = deploy(ld.Slow.options(version="1").bind(), "graceful")
    http = service.http(timeout=60)
    old_pid = http.get(f"/{name}").json()["pid"]
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(r=http.get(f"/{name}", params={"sleep": "15"})))
    thread.start()
    time.sleep(0.5)
    # a new version retires the old replica while the 15 s request runs on it; past its
    # graceful_shutdown_timeout_s (0.5 s) the request is handed back, and the new replica runs it again
    started = time.monotonic()
    deploy(ld.Slow.options(version="2").bind(fast=True), "graceful", name=name)
    retired_within = time.monotonic() - started
    thread.join(timeout=60)
    assert result["r"].status_code == 200
    assert result["r"].json()["pid"] != old_pid  # answered by the new replica, not the retired one
    assert result["r"].json()["fast"] is True
    assert retired_within < 12  # the old replica did not wait for the 15 s request


def test_delete_answers_404_at_once_ends_queued_requests_and_stops_replicas(
    service: Served, deploy: Callable[..., str]
) -> None:
    name = deploy(ld.doomed_app, "doomed")
    http = service.http(timeout=60)
    answers: list[httpx.Response] = []
    threads = [
        threading.Thread(target=lambda: answers.append(http.get(f"/{name}", params={"sleep": "1.5"}))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    time.sleep(0.5)  # one runs, two wait in the queue
    serve.delete(name, _blocking=False)
    assert http.get(f"/{name}").status_code == 404
    assert serve.status().applications[name].status == ApplicationStatus.DELETING  # its replica finishes
    for t in threads:
        t.join(timeout=60)
    codes = sorted(r.status_code for r in answers)
    assert codes == [200, 404, 404], [r.text for r in answers]
    assert any("was deleted before this request" in r.text for r in answers)
    wait_until(lambda: name not in serve.status().applications, timeout_s=30, what="its replicas to stop")
    assert not redis_client_of(service).hkeys(f"serve:replicas:{name}:one_at_a_time")
    with pytest.raises(DeploymentNotFoundError, match="no application named"):
        serve.get_app_handle(name)
    with pytest.raises(DeploymentNotFoundError):
        serve.delete(name)


STOPPING_SERVICE = """
import asyncio

import celery_serve as serve


@serve.deployment(graceful_shutdown_timeout_s=10)
class Slow:
    async def __call__(self, request):
        await asyncio.sleep(float(request.query_params.get("sleep", "0")))
        return "ok"


app = Slow.bind()
"""


def test_a_stopping_run_answers_503_retry_never_404_until_it_runs_again_or_is_deleted(
    service: Served, tmp_path: Path, redis_client: Any
) -> None:
    """A run that stops (here SIGTERM, as `celery-serve shutdown` sends) removes its application while its
    replicas finish what they run; callers meanwhile, and for a while after, are told to retry (503), not
    that there is no such thing (404, which nobody retries), on every way in."""
    name = f"stopping-{uuid.uuid4().hex[:4]}"
    (tmp_path / "svc.py").write_text(STOPPING_SERVICE)

    def start() -> CliProcess:
        cli = CliProcess.serve("svc:app", service.redis_url, tmp_path, "--name", name, "--route-prefix", f"/{name}")
        cli.wait_for_line(READY_LINE, 180)
        return cli

    run = start()
    try:
        own = httpx.Client(base_url=run.base_url, timeout=60)
        assert own.get(f"/{name}").status_code == 200
        answers: list[httpx.Response] = []
        long: list[httpx.Response] = []
        stop = threading.Event()

        def hammer() -> None:
            with httpx.Client(base_url=run.base_url, timeout=60) as http:
                while not stop.is_set():
                    try:
                        answers.append(http.get(f"/{name}"))
                    except httpx.TransportError:
                        return  # its gateway stopped

        threads = [
            threading.Thread(target=hammer),
            threading.Thread(target=lambda: long.append(own.get(f"/{name}", params={"sleep": "2"}))),
        ]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(answers) >= 20, what="requests served before the stop")
        run.stop()  # the run removes its application, its replica finishes the 2 s request, then all stop
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        codes = Counter(r.status_code for r in answers)
        assert [r.status_code for r in long] == [200]  # the request running at the stop was answered
        assert 404 not in codes, codes
        refused = [r for r in answers if r.status_code == 503]
        assert refused, codes  # the gateway stayed up while the replica finished, refusing what came
        assert {(r.json()["error"], r.headers["retry-after"]) for r in refused} == {("ApplicationStoppedError", "5")}

        # after the run is gone: another gateway, the jobs API and the Python client say the same
        http = service.http()
        wait_until(lambda: http.get(f"/{name}").status_code == 503, what="the shared gateway to say 503")
        assert "its run stopped" in http.get(f"/{name}").json()["message"]
        job = http.post("/jobs/Slow", params={"app": name}, json=None)
        assert job.status_code == 503 and job.json()["error"] == "ApplicationStoppedError", job.text
        for how in ({"redis_url": service.redis_url}, {"url": service.gateway_url}):
            with serve.Client(**how, app=name) as client:
                with pytest.raises(serve.ApplicationStoppedError, match="retry once it runs again"):
                    client.call("Slow")
        stopped = app_status(name)  # and serve.status() / `celery-serve status` list it, not running
        assert stopped is not None and stopped.status == ApplicationStatus.NOT_STARTED, stopped
        assert "its run stopped" in stopped.message and "503" in stopped.message

        # running it again serves at once
        run = start()
        assert httpx.get(f"{run.base_url}/{name}", timeout=60).status_code == 200
        assert not redis_client.hexists("serve:stopped:{serve:apps}", name)
        run.stop()
        # deleting a stopped application is for good: 404 from then on
        serve.delete(name)
        wait_until(lambda: http.get(f"/{name}").status_code == 404, what="404 once deleted")
        assert app_status(name) is None
        with pytest.raises(DeploymentNotFoundError):
            serve.delete(name)
    finally:
        if run.proc.poll() is None:
            run.kill_everything()


def test_the_seed_quick_start_runs_as_written() -> None:
    """Ray Serve 1.x's tutorial: serve.start(), Counter.deploy() at /Counter, then a new Counter deployed
    again as a rolling update (its count starts from zero)."""
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(SERVE_PORT=str(free_port()), SERVE_LOG_LEVEL="ERROR")
    script = os.path.join(os.path.dirname(__file__), "..", "examples", "quickstart.py")
    done = subprocess.run(
        [sys.executable, script], env=env, capture_output=True, text=True, timeout=240, cwd=os.path.dirname(script)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:5] == [
        "{'count': 1}",
        "{'count': 2}",
        "{'count': 0}",
        "{'count': 1}",
        "{'count': 0}",
    ], done.stdout


def test_a_config_file_runs_two_applications_with_overrides_and_deploy_reconfigures_in_place(
    service: Served, tmp_path: Any
) -> None:
    tag = uuid.uuid4().hex[:4]
    echo, front = f"cfg-echo-{tag}", f"cfg-front-{tag}"
    text = f"""\
applications:
- name: {echo}
  route_prefix: /{echo}
  import_path: tests.lifecycle_deployments:echo_app
  deployments:
  - name: Echo
    num_replicas: 2
    user_config: {{mode: loud}}
- name: {front}
  route_prefix: /{front}
  import_path: tests.lifecycle_deployments:front_app
  deployments:
  - name: Echo
    user_config: {{mode: inner}}
"""
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    env = {**os.environ, "REDIS_URL": service.redis_url}
    cli = [sys.executable, "-m", "celery_serve"]
    try:
        handles = _serve.run_config(str(path), redis_url=service.redis_url, startup_timeout_s=150)
        assert set(handles) == {echo, front}
        http = service.http()
        answers = [http.get(f"/{echo}").json() for _ in range(30)]
        assert {a["config"]["mode"] for a in answers} == {"loud"}
        pids = {a["pid"] for a in answers}
        assert len(pids) == 2  # num_replicas overridden from 1 to 2
        assert http.get(f"/{front}").json()["echo"]["config"] == {"mode": "inner"}
        assert http.get(f"/{front}").json()["echo"]["prefix"] == "inner"  # the code's bind argument

        live = subprocess.run([*cli, "config"], env=env, capture_output=True, text=True, check=True).stdout
        assert f"name: {echo}" in live and "mode: loud" in live and "num_replicas: 2" in live

        path.write_text(text.replace("mode: loud", "mode: quiet"))
        subprocess.run([*cli, "deploy", str(path), "--replace"], env=env, check=True, capture_output=True)
        wait_until(
            lambda: {http.get(f"/{echo}").json()["config"]["mode"] for _ in range(10)} == {"quiet"},
            timeout_s=30,
            what="the new user_config",
        )
        assert {http.get(f"/{echo}").json()["pid"] for _ in range(20)} <= pids  # reconfigured, not restarted
    finally:
        for name in (echo, front):
            try:
                serve.delete(name)
            except DeploymentNotFoundError:
                pass


def test_a_replica_that_starts_while_redis_is_away_says_so_in_one_line_and_records_no_failure() -> None:
    """A Redis restart or failover while a replica starts is not the deployment's fault: one warning, no
    traceback, and an exit code that is not the constructor-failure code (which counts toward
    DEPLOY_FAILED); its pool starts it again."""
    port = free_port()  # nothing listens there
    started = subprocess.run(
        [sys.executable, "-m", "celery_serve.workers.replica_main", "--app", "away", "--deployment", "Echo"],
        env={**os.environ, "REDIS_URL": f"redis://127.0.0.1:{port}/0", "SERVE_REDIS_TIMEOUT_S": "0.5"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert started.returncode == 1, (started.returncode, started.stderr)
    assert "Traceback" not in started.stderr, started.stderr
    assert "could not start: Redis did not answer" in started.stderr and "its pool starts it again" in started.stderr
