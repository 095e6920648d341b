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
import warnings
from typing import Any

from celery.worker import control as celery_control
from kombu import Exchange, Queue

from celery_serve._runtime.spec import AppSpec
from celery_serve._wire import keys as _keys
from celery_serve._wire.connections import sync_client
from celery_serve.config import start_replicas
from celery_serve.exceptions import DeploymentNotFoundError
from celery_serve.workers.celery_app import make_celery, redis_url_of
from celery_serve.workers.gpus import PlacementError, discover_devices, plan_placement
from celery_serve.workers.pool import ReplicaPool

logger = logging.getLogger(__name__)


def control_queue(app: str, deployment: str) -> str:
    """The queue Celery's own consumer listens on: control tasks only, never requests."""
    return f"serve.control.{app}.{deployment}"


def wait_for_spec(url: str, app: str, timeout_s: float | None = None) -> AppSpec:
    """Wait until the application is deployed (a worker may start before `deploy` ran)."""
    with sync_client(url) as client:  # closed once the spec is read: the worker keeps no idle connection for it
        return _wait_for_spec(client, app, timeout_s)


def _wait_for_spec(client: Any, app: str, timeout_s: float | None) -> AppSpec:
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
    count = replicas if replicas is not None else start_replicas(config)
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
        logger.warning(
            "deployment '%s' asks for GPUs but none were found: running on the CPU (allow_cpu_fallback)", deployment
        )
        cpu_fallback = True
    elif num_gpus > 0 and not placement and count > 0:
        plan_placement(count, num_gpus, devices)  # fail now, with a clear message, if the replicas cannot fit
    check_memory(deployment, count, config.get("memory"))
    celery = make_celery(url)
    celery.conf.serve_app = app
    celery.conf.serve_deployment = deployment
    celery.conf.serve_hostname = socket.gethostname()
    celery.conf.serve_queue = spec.deployments[deployment].queue
    celery.conf.serve_max_deliveries = int(config.get("max_deliveries") or 3)
    celery.conf.serve_spec_json = spec.to_json()  # re-announced if Redis loses its data
    celery.conf.serve_num_gpus = num_gpus
    celery.conf.serve_devices = devices if num_gpus > 0 and not cpu_fallback else []
    celery.conf.serve_placement = placement
    celery.conf.serve_cpu_fallback = cpu_fallback
    celery.conf.serve_replica_env = replica_threads_env(float(config.get("num_cpus") or 1))
    hostname = f"{app}.{deployment}.{os.getpid()}@{socket.gethostname()}"
    celery.conf.serve_worker_hostname = hostname
    celery.conf.serve_initial_replicas = count  # may be 0 (scale to zero); Celery reads 0 as "one per core"
    celery.conf.serve_num_cpus = 1.0 if config.get("num_cpus") is None else float(config["num_cpus"])
    celery.conf.serve_max_replicas_per_node = config.get("max_replicas_per_node")
    celery.conf.serve_deployed_at = spec.deployed_at
    celery.conf.serve_identity = spec.deployments[deployment].identity
    celery.conf.serve_worker_options = spec.deployments[deployment].worker_options()
    celery.conf.serve_graceful_shutdown_timeout_s = config.get("graceful_shutdown_timeout_s")
    celery.conf.serve_health_check_period_s = config.get("health_check_period_s")
    celery.conf.serve_health_check_timeout_s = config.get("health_check_timeout_s")
    celery.conf.serve_machine, celery.conf.serve_machine_cpus, celery.conf.serve_machine_gpus = machine_capacity(
        devices
    )
    os.environ["REDIS_URL"] = url
    install_control_commands()
    keep_our_logging()
    worker = celery.Worker(
        hostname=hostname,
        pool_cls=ReplicaPool,
        concurrency=max(count, 1),
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


def machine_memory() -> float:
    """This machine's memory in bytes (`SERVE_MACHINE_MEMORY` overrides it, as `ray start --memory` does)."""
    given = os.environ.get("SERVE_MACHINE_MEMORY")
    if given:
        return float(given)
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_memory(deployment: str, count: int, memory: float | None) -> None:
    """`memory` (ray_actor_options["memory"]) is reserved per replica: refuse to start more replicas than
    this machine holds, with the numbers, instead of letting the kernel kill them later."""
    if not memory or count <= 0:
        return
    total = machine_memory()
    if count * float(memory) > total:
        raise PlacementError(
            f"deployment '{deployment}' asks for {count} replicas of memory={float(memory) / 2**30:.2f} GiB each "
            f"but this machine has {total / 2**30:.2f} GiB (SERVE_MACHINE_MEMORY overrides what is found); "
            "lower num_replicas or memory, or add machines"
        )


def machine_capacity(devices: list[str]) -> tuple[str, float, float]:
    """This machine's name and what the scaler may place on it: cores and GPUs.

    `SERVE_MACHINE_ID`, `SERVE_MACHINE_CPUS` and `SERVE_MACHINE_GPUS` override what is found (as
    `ray start --num-cpus` does): to keep cores for other work, or to split one host between teams.
    """
    name = os.environ.get("SERVE_MACHINE_ID") or socket.gethostname()
    cpus = os.environ.get("SERVE_MACHINE_CPUS")
    gpus = os.environ.get("SERVE_MACHINE_GPUS")
    found_cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return name, float(cpus) if cpus else float(found_cpus), float(gpus) if gpus else float(len(devices))


_original_active_queues = celery_control.Panel.data["active_queues"]
_original_enable_events = celery_control.Panel.data["enable_events"]
_original_disable_events = celery_control.Panel.data["disable_events"]
TASK_EVENTS_TTL_S = 30  # Flower repeats enable_events every 5 s; events stop half a minute after it goes


def _active_queues(state: Any) -> list[dict[str, Any]]:
    """Celery's `active_queues`, plus the deployment queue that this worker's replicas consume.

    Flower's broker view and `celery inspect active_queues` list a worker's queues from this reply; the
    Celery consumer itself only listens on the control queue, so without this the request queue is invisible.
    """
    queues: list[dict[str, Any]] = list(_original_active_queues(state))
    name = state.consumer.app.conf.get("serve_queue")
    if name and all(q.get("name") != name for q in queues):
        queues.append(dict(Queue(name, Exchange(name), routing_key=name).as_dict(recurse=True)))
    return queues


def _pool_client(state: Any) -> Any:
    """The Redis client of this worker's replica pool: remote-control commands open no connections of their own
    (Flower sends enable_events every 5 s)."""
    pool = getattr(state.consumer, "pool", None)
    client = getattr(pool, "redis_client", None)
    return client if client is not None else sync_client(redis_url_of(state.consumer.app))


def _enable_events(state: Any) -> Any:
    """Celery's `enable_events` (Flower sends it every 5 s), which also tells this deployment's replicas
    to send task events: they publish only while `serve:task-events` exists (see `celery_serve.workers.events`)."""
    try:
        _pool_client(state).set(_keys.TASK_EVENTS, 1, ex=TASK_EVENTS_TTL_S)
    except Exception as exc:  # noqa: BLE001 - events are best effort
        logger.warning("could not enable task events in Redis: %s", exc)
    return _original_enable_events(state)


def _disable_events(state: Any) -> Any:
    try:
        _pool_client(state).delete(_keys.TASK_EVENTS)
    except Exception as exc:  # noqa: BLE001 - the key expires anyway
        logger.warning("could not disable task events in Redis: %s", exc)
    return _original_disable_events(state)


def install_control_commands() -> None:
    """Replace three of Celery's remote-control commands in this worker process (only: it is ours) with
    versions that know the replicas: `active_queues` lists the deployment queue, `enable_events` and
    `disable_events` reach the replicas through Redis."""
    celery_control.Panel.data["active_queues"] = _active_queues
    celery_control.Panel.data["enable_events"] = _enable_events
    celery_control.Panel.data["disable_events"] = _disable_events


def _keep_logging(**_kwargs: Any) -> None:
    """A `setup_logging` receiver: its presence tells Celery the process's logging is already set up."""


def _say(message: str, _file: Any = None) -> None:
    logger.info("%s", message.strip())


def keep_our_logging() -> None:
    """Leave logging as `celery_serve._runtime.logs` set it up, in this worker process: Celery configures
    nothing, and its own shutdown notices ("worker: Warm shutdown (MainProcess)", printed raw to stdout by
    every worker) become INFO lines in the common format."""
    from celery import signals
    from celery.apps import worker as celery_worker

    signals.setup_logging.connect(_keep_logging, weak=False)
    celery_worker.safe_say = _say  # type: ignore[assignment]
    if hasattr(os, "getuid") and os.getuid() == 0:
        # Celery's multi-line SecurityWarning is about accepting pickle as root; this worker accepts JSON only.
        warnings.filterwarnings("ignore", message="You're running the worker with superuser privileges")
        logger.warning("running as root: an unprivileged user is safer (messages are JSON only, never pickle)")
