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
from workers.gpus import PlacementError, discover_devices, plan_placement
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


def run_worker(
    url: str,
    app: str,
    deployment: str,
    replicas: int | None = None,
    log_level: str = "WARNING",
    devices: list[str] | None = None,
    placement: list[list[str]] | None = None,
) -> None:
    """Run the deployment's worker until SIGTERM/SIGINT (Celery's warm shutdown stops the replicas).

    `devices` are the GPUs this worker may place replicas on (default: all it finds); `placement` gives
    each replica's devices outright (what `celery-serve run` decides for all deployments of a machine).
    """
    spec = wait_for_spec(url, app)
    if deployment not in spec.deployments:
        known = ", ".join(sorted(spec.deployments))
        raise DeploymentNotFoundError(f"application '{app}' has no deployment '{deployment}' (it has: {known})")
    config = spec.deployments[deployment].config
    count = replicas or int(config["num_replicas"])
    num_gpus = float(config.get("num_gpus") or 0)
    devices = discover_devices() if devices is None else devices
    cpu_fallback = False
    if num_gpus > 0 and not devices and not placement:
        if not config.get("allow_cpu_fallback"):
            raise PlacementError(
                f"deployment '{deployment}' needs GPUs (num_gpus={num_gpus}) but this machine has none "
                "(nvidia-smi finds no device; --devices or SERVE_GPU_DEVICES can name them); for development, "
                "set allow_cpu_fallback=True on the deployment to run it on the CPU"
            )
        logger.warning("deployment '%s' asks for GPUs but none were found: running on the CPU (allow_cpu_fallback)", deployment)
        cpu_fallback = True
    elif num_gpus > 0 and not placement:
        plan_placement(count, num_gpus, devices)  # fail now, with a clear message, if the replicas cannot fit
    celery = make_celery(url)
    celery.conf.serve_app = app
    celery.conf.serve_deployment = deployment
    celery.conf.serve_hostname = socket.gethostname()
    celery.conf.serve_queue = spec.deployments[deployment].queue
    celery.conf.serve_num_gpus = num_gpus
    celery.conf.serve_devices = devices if num_gpus > 0 and not cpu_fallback else []
    celery.conf.serve_placement = placement
    celery.conf.serve_cpu_fallback = cpu_fallback
    celery.conf.serve_replica_env = replica_threads_env(float(config.get("num_cpus") or 1))
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


def replica_threads_env(num_cpus: float) -> dict[str, str]:
    """Thread-pool sizes for one replica from its `num_cpus`, so replicas on a machine do not fight over
    cores (torch, NumPy's BLAS and tokenizers read these at start-up); `SERVE_NUM_CPUS` is what
    `get_replica_context().num_cpus` reports."""
    threads = str(max(1, int(num_cpus)))
    return {
        "SERVE_NUM_CPUS": str(num_cpus),
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
    }
