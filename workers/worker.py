"""Start one deployment's Celery worker: a `ReplicaPool` of `num_replicas` replica processes.

`celery-serve worker --app-name A --deployment D` runs this in the foreground; `celery-serve run` starts
one per deployment. The worker appears in Flower and answers `celery inspect`/`celery control` as
`A.D.<pid>@<host>`.
"""

from __future__ import annotations

import logging
import os
import socket
import time

from app import _keys
from app._redis import sync_client
from app._spec import AppSpec
from app.exceptions import DeploymentNotFoundError
from workers.celery_app import make_celery
from workers.pool import ReplicaPool

logger = logging.getLogger(__name__)


def control_queue(app: str, deployment: str) -> str:
    """The queue Celery's own consumer listens on: control tasks only, never requests."""
    return f"serve.control.{app}.{deployment}"


def wait_for_spec(url: str, app: str, timeout_s: float | None = None) -> AppSpec:
    """Wait until the application is deployed (a worker may start before `deploy` ran)."""
    client = sync_client(url)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    announced = False
    while True:
        raw = client.hget(_keys.APPS, app)
        if raw is not None:
            return AppSpec.from_json(raw)
        if deadline is not None and time.monotonic() > deadline:
            raise DeploymentNotFoundError(f"application '{app}' was not deployed within {timeout_s}s")
        if not announced:
            logger.warning("waiting for application '%s' to be deployed (celery-serve deploy ...)", app)
            announced = True
        time.sleep(0.5)


def run_worker(url: str, app: str, deployment: str, replicas: int | None = None, log_level: str = "WARNING") -> None:
    """Run the deployment's worker until SIGTERM/SIGINT (Celery's warm shutdown stops the replicas)."""
    spec = wait_for_spec(url, app)
    if deployment not in spec.deployments:
        known = ", ".join(sorted(spec.deployments))
        raise DeploymentNotFoundError(f"application '{app}' has no deployment '{deployment}' (it has: {known})")
    count = replicas or int(spec.deployments[deployment].config["num_replicas"])
    celery = make_celery(url)
    celery.conf.serve_app = app
    celery.conf.serve_deployment = deployment
    celery.conf.serve_hostname = socket.gethostname()
    celery.conf.serve_queue = spec.deployments[deployment].queue
    os.environ["REDIS_URL"] = url
    worker = celery.Worker(
        hostname=f"{app}.{deployment}.{os.getpid()}@{socket.gethostname()}",
        pool_cls=ReplicaPool,
        concurrency=count,
        queues=[control_queue(app, deployment)],
        loglevel=log_level.upper(),
        without_mingle=True,  # replicas share nothing through mingle; skip its start-up round trip
        without_gossip=True,  # no worker-to-worker chatter is needed; saves a pub/sub consumer
        quiet=True,
    )
    worker.start()
    code = getattr(worker, "exitcode", 0) or 0
    if code:
        raise SystemExit(code)
