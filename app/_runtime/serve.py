"""`run()` and `shutdown()`: what Ray Serve's `serve.run` does, on Redis and Celery workers.

`run` starts what is not yet running (an embedded Redis when no `REDIS_URL`, the gateway, each
deployment's worker), writes the application's spec, waits until every replica is up and the gateway
routes to it, and returns the ingress handle. `shutdown` stops what `run` started.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from celery_serve._runtime import apps as _apps
from celery_serve._runtime import context as _context
from celery_serve._runtime import embedded_redis, flower_auth, state
from celery_serve._runtime.launcher import (
    ManagedProcess,
    ProcessGroup,
    check_port_free,
    flower_command,
    free_port,
    gateway_command,
    redis_env,
    scaler_command,
    worker_command,
)
from celery_serve._runtime.spec import AppSpec, build_spec
from celery_serve._wire import keys as _keys
from celery_serve._wire import lifecycle as _lifecycle
from celery_serve._wire import scripts as _scripts
from celery_serve._wire import stopped_apps as _stopped_apps
from celery_serve._wire.connections import REDIS_WAIT_S, check_url, sync_client, wait_for_redis
from celery_serve.api import middlewares as _middlewares
from celery_serve.application import Application
from celery_serve.config import start_replicas
from celery_serve.exceptions import ApplicationConflictError, ServeError, ServeStartupError
from celery_serve.handle import DeploymentHandle

logger = logging.getLogger(__name__)

DEFAULT_STARTUP_TIMEOUT_S = 180.0


OWNER_BEAT_S = 3.0  # how often a run says it is alive
OWNER_TTL_S = 15.0  # how long after its last beat a run's applications may be taken over


@dataclass
class _Session:
    """What this process started: shared by every `run` until `shutdown`."""

    redis_url: str
    group: ProcessGroup
    kind: str = "python"  # "cli" when `celery-serve run` started it
    id: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    started_at: float = field(default_factory=time.time)
    gateway_url: str | None = None
    workers: dict[str, set[str]] = field(default_factory=dict)  # app name -> process names
    specs: dict[str, AppSpec] = field(default_factory=dict)  # app name -> the spec this run deployed last
    scaler: bool = False
    scaler_died_at: float = float("-inf")  # when it was last started again after exiting
    flower_url: str | None = None
    beat: _OwnerBeat | None = None
    embedded: embedded_redis.EmbeddedRedis | None = None  # the Redis this session started, if it did
    flower_credentials: flower_auth.FlowerAuth | None = None

    @property
    def owner(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "kind": self.kind,
            "started_at": self.started_at,
        }

    def record(self) -> state.RunRecord:
        return state.RunRecord(
            pid=os.getpid(),
            redis_url=self.redis_url,
            kind=self.kind,
            session_id=self.id,
            cwd=os.getcwd(),
            started_at=self.started_at,
            gateway_url=self.gateway_url,
            flower_url=self.flower_url,
            apps=sorted(self.workers),
            children=[{"name": m.name, "pid": m.proc.pid} for m in self.group.processes],
        )


class _OwnerBeat(threading.Thread):
    """Tells Redis every few seconds that this run is alive, so its application names stay its own."""

    def __init__(self, redis_url: str, session_id: str) -> None:
        super().__init__(name="celery-serve-owner", daemon=True)
        self.client = sync_client(redis_url)
        self.session_id = session_id
        self.stopping = threading.Event()

    def beat(self) -> None:
        self.client.hset(_keys.OWNERS, self.session_id, time.time() + OWNER_TTL_S)

    def run(self) -> None:
        while not self.stopping.wait(OWNER_BEAT_S):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - Redis may be restarting; the next beat tries again
                logger.debug("owner beat failed: %s", exc)

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.client.hdel(_keys.OWNERS, self.session_id)
        except Exception as exc:  # noqa: BLE001 - Redis may be gone; the entry ages out anyway
            logger.debug("could not remove the owner entry: %s", exc)


_lock = threading.RLock()
_session: _Session | None = None


def deploy_spec(redis_url: str, spec: AppSpec, *, replace: bool = False) -> None:
    """Write an application's spec (gateways pick it up within a second).

    Refuses with `ApplicationConflictError` when another live run owns the name, unless `replace`.
    """
    client = sync_client(redis_url)
    found = client.register_script(_scripts.CLAIM_APP)(
        keys=[_keys.APPS, _keys.OWNERS],
        args=[spec.name, spec.to_json(), (spec.owner or {}).get("id", ""), time.time(), 1 if replace else 0],
    )
    if found:
        raise ApplicationConflictError(_conflict_message(spec.name, AppSpec.from_json(found).owner or {}))
    pipe = client.pipeline(transaction=False)
    for name in spec.deployments:
        for key in (  # one key per DEL: on a cluster they live in different slots
            _keys.deployment_error(spec.name, name),
            _lifecycle.deploy_failed(spec.name, name),
            _lifecycle.constructor_failures(spec.name, name),
        ):
            pipe.delete(key)
    pipe.hdel(_apps.DELETING, spec.name)
    pipe.hdel(_keys.STOPPED, spec.name)
    pipe.execute()
    client.publish(_keys.APPS_CHANGED, spec.name)  # after: a cluster pipeline cannot carry PUBLISH


def _conflict_message(name: str, owner: dict[str, Any]) -> str:
    how = "celery-serve run" if owner.get("kind") == "cli" else "serve.run()"
    since = time.strftime("%H:%M:%S", time.localtime(float(owner.get("started_at") or 0)))
    return (
        f"application '{name}' is served by another live run ({how}, pid {owner.get('pid')} on "
        f"{owner.get('host')}, since {since}); stop it first (`celery-serve shutdown` in its folder), choose "
        "another name (--name), or replace it (--replace; run(..., replace=True))"
    )


def delete_app(redis_url: str, name: str, *, owner_id: str | None = None, stopped_note: str = "") -> bool:
    """Remove an application's spec; with `owner_id`, only while that run still owns it, leaving
    `stopped_note` (see `_wire.stopped_apps`) when one is given. True if removed."""
    client = sync_client(redis_url)
    if owner_id is not None:
        release = client.register_script(_scripts.RELEASE_APP)
        removed = bool(release(keys=[_keys.APPS, _keys.STOPPED], args=[name, owner_id, stopped_note]))
    else:
        removed = bool(client.hdel(_keys.APPS, name))
    if removed:
        client.publish(_keys.APPS_CHANGED, name)
    return removed


def run(
    target: Application,
    *,
    name: str = "default",
    route_prefix: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    redis_url: str | None = None,
    blocking: bool = False,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    replace: bool = False,
    http_options: dict[str, Any] | None = None,
    _source: str | None = None,
    _kind: str = "python",
    _local_testing_mode: bool = False,
) -> DeploymentHandle:
    """Deploy an application and return a handle to its ingress deployment.

    Starts an embedded Redis unless `redis_url` or `REDIS_URL` is given, the HTTP gateway on host:port
    and the scaler (unless this process already started them; `SERVE_SCALER=0` skips the scaler), and
    one worker pool per deployment. Running an application again from this process replaces it; an
    application of the same name that another live run serves on the same Redis is refused
    (`ApplicationConflictError`) unless `replace=True`. An autoscaled deployment is ready with its
    `initial_replicas` (or `min_replicas`, which may be 0).

    `_local_testing_mode=True` (as in Ray, for unit tests) runs the application in this process instead:
    no Redis, no workers, no HTTP; the handle behaves as the distributed one.

    `http_options={"middlewares": [Middleware(CORSMiddleware, allow_origins=[...]), ...]}` wraps the gateway
    in Starlette middlewares, as in Ray Serve (they apply when this call starts the gateway).
    """
    if _local_testing_mode:
        from celery_serve._runtime.local import run_local

        return run_local(target, name)
    if os.environ.get("CELERY_SERVE_REPLICA"):
        raise ServeError(
            "run() was called while a worker imported your application: put the run() call under "
            "`if __name__ == '__main__':` (workers import the module to find your deployments)"
        )
    spec = build_spec(target, name, route_prefix, source=_source)
    middlewares = _middlewares.from_http_options(http_options)
    handle = run_spec(spec, host, port, redis_url, startup_timeout_s, replace, _kind, middlewares=middlewares)
    if blocking:
        _block_until_interrupted()
    return handle


def run_config(
    path: str,
    *,
    host: str | None = None,
    port: int | None = None,
    redis_url: str | None = None,
    startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S,
    replace: bool = False,
    import_target: Any = None,
    _kind: str = "python",
) -> dict[str, DeploymentHandle]:
    """Run every application of a config file (Ray Serve's schema, see `config_file`), with its overrides;
    the whole file is checked before anything starts. Returns each application's ingress handle."""
    from celery_serve._runtime.config_file import ConfigFile

    config = ConfigFile(path)
    specs = config.specs(import_target or _import_path)
    http = config.config.http_options
    middlewares = http.middleware_spec()  # they wrap the gateway this call starts (the first spec's run)
    handles = {}
    for index, spec in enumerate(specs):
        handles[spec.name] = run_spec(
            spec,
            host or http.host,
            port or http.port,
            redis_url,
            startup_timeout_s,
            replace,
            _kind,
            middlewares=middlewares if index == 0 else None,
        )
    return handles


def _import_path(path: str) -> Any:
    import importlib

    module, _, attr = path.partition(":")
    found: Any = importlib.import_module(module)
    for part in (attr or "app").split("."):
        found = getattr(found, part)
    return found


def run_spec(
    spec: AppSpec,
    host: str,
    port: int,
    redis_url: str | None,
    startup_timeout_s: float,
    replace: bool,
    kind: str,
    middlewares: str | None = None,
) -> DeploymentHandle:
    """Deploy a built spec in this process's session (see `run`) and wait until it serves.

    An update that does not come up (a constructor that raises, replicas that never serve) is rolled back, as
    Ray keeps the old version of a failed update: the previous spec is restored, its workers keep serving, and
    `ServeStartupError` says so. A first deployment that does not come up is removed."""
    with _lock:
        check_per_node_limits(spec)
        session = _ensure_session(redis_url, host, port, kind)
        placements = plan_gpus(spec)
        previous = session.specs.get(spec.name)
        previous_workers = set(session.workers.get(spec.name, set()))
        spec.owner = session.owner
        deploy_spec(session.redis_url, spec, replace=replace)
        _start_services(session, host, port, middlewares)
        names, retired, rolling = _start_workers(session, spec, placements)
        session.workers[spec.name] = names
        session.specs[spec.name] = spec
        state.save(session.record())
    try:
        wait_until_ready(session, spec, startup_timeout_s, rolling)
    except ServeStartupError as exc:
        if previous is not None:
            _roll_back(session, previous, previous_workers, names - previous_workers)
            raise ServeStartupError(
                f"{exc}; the update was rolled back: the previous version of '{spec.name}' keeps serving"
            ) from None
        with _lock:
            session.group.stop(session.workers.pop(spec.name, set()) | retired)
            session.specs.pop(spec.name, None)
        delete_app(session.redis_url, spec.name, owner_id=session.id)
        raise
    if retired:
        # the new version serves: the old workers' replicas finish (or hand back) what they hold and stop
        session.group.stop(retired, worker_grace_s(spec))
    return DeploymentHandle(spec.ingress, spec.name)


def _roll_back(session: _Session, previous: AppSpec, workers: set[str], started: set[str]) -> None:
    """Restore the spec that served before a failed update: the workers started for the update stop, the
    previous ones (never stopped) keep serving, and pools that began rolling their replicas over roll back."""
    logger.warning("the update of '%s' did not come up: rolling back to the previous version", previous.name)
    with _lock:
        session.group.stop(started)
        session.workers[previous.name] = workers
        session.specs[previous.name] = previous
        previous.owner = session.owner
        deploy_spec(session.redis_url, previous, replace=True)
        state.save(session.record())


def _ensure_session(redis_url: str | None, host: str, port: int, kind: str) -> _Session:
    """This process's session, started (Redis reached or embedded, owner beat) if there is none yet."""
    global _session
    if _session is None:
        url = redis_url or os.environ.get("REDIS_URL")
        if url:
            check_url(url)
        check_port_free(host, port, "the gateway", "port=")
        group = ProcessGroup()
        embedded = None
        if url:
            wait_for_redis(url, REDIS_WAIT_S)
        else:
            embedded = embedded_redis.start(group, port=_embedded_port())
            url = embedded.url
        _session = _Session(url, group, kind=kind, embedded=embedded)
        _session.beat = _OwnerBeat(url, _session.id)
        _session.beat.beat()
        _session.beat.start()
        atexit.register(shutdown)
    _context.set_redis_url(_session.redis_url)
    return _session


def _start_services(session: _Session, host: str, port: int, middlewares: str | None = None) -> None:
    """The gateway (wrapped in `middlewares`, see `celery_serve.api.middlewares`) and the scaler, once per
    session; the Redis URL reaches them in their environment, never on a command line."""
    if session.gateway_url is None:
        check_port_free(host, port, "the gateway", "port=")
        extra = {"SERVE_HTTP_MIDDLEWARES": middlewares} if middlewares else None
        session.group.start("gateway", gateway_command(host, port), env=redis_env(session.redis_url, extra))
        session.gateway_url = f"http://{host}:{port}"
    elif middlewares:
        raise ServeError(
            "http_options apply when the gateway starts, and this process's gateway is already running: pass "
            "them to the first run() (or call shutdown() first)"
        )
    if not session.scaler and os.environ.get("SERVE_SCALER", "1") != "0":
        # one per session; more against the same Redis stand by (see celery_serve.workers.scaler)
        session.group.start("scaler", scaler_command(), env=redis_env(session.redis_url))
        session.scaler = True


def start(
    *,
    detached: bool = False,
    http_options: dict[str, Any] | None = None,
    redis_url: str | None = None,
    **ray_options: Any,
) -> None:
    """Start the service without an application (Ray Serve 1.x's `serve.start()`): Redis (embedded unless
    `redis_url`/`REDIS_URL`), the HTTP gateway (`http_options={"host": ..., "port": ...}`, default
    $SERVE_HOST:$SERVE_PORT, else 127.0.0.1:8000) and the scaler; returns once the gateway answers.
    Deployments then go up with `serve.run(app)` or `Deployment.deploy()`. Does nothing inside a replica
    (which imports the script that calls it)."""
    if os.environ.get("CELERY_SERVE_REPLICA"):
        return
    options = dict(http_options or {})
    unknown = set(options) - {"host", "port", "location", "root_path", "request_timeout_s", "keep_alive_timeout_s"}
    if unknown:
        raise ServeError(f"unknown http_options {sorted(unknown)}: celery-serve's gateway takes host and port")
    if detached:
        logger.warning(
            "serve.start(detached=True): the service stops when this process exits; run it with "
            "`celery-serve run` (or docker compose) to keep it up on its own"
        )
    if ray_options:
        logger.warning("serve.start(): %s have no effect here", ", ".join(sorted(ray_options)))
    host = str(options.get("host") or os.environ.get("SERVE_HOST") or "127.0.0.1")
    port = int(options.get("port") or os.environ.get("SERVE_PORT") or 8000)
    with _lock:
        session = _ensure_session(redis_url, host, port, "python")
        _start_services(session, host, port)
        state.save(session.record())
    _wait_for_gateway(session, time.monotonic() + DEFAULT_STARTUP_TIMEOUT_S)


def status() -> Any:
    """Every application's and deployment's status, as Ray Serve's `serve.status()` (a `ServeStatus`)."""
    return _apps.serve_status(sync_client(redis_url()))


def get_app_handle(name: str) -> DeploymentHandle:
    """A handle to the ingress deployment of the running application `name` (Ray's `serve.get_app_handle`)."""
    from celery_serve.exceptions import DeploymentNotFoundError

    raw = sync_client(redis_url()).hget(_keys.APPS, name)
    if raw is None:
        known = sorted(_text(k) for k in sync_client(redis_url()).hkeys(_keys.APPS))
        raise DeploymentNotFoundError(
            f"no application named '{name}' is running (running: {', '.join(known) or 'none'})"
        )
    return DeploymentHandle(AppSpec.from_json(raw).ingress, name)


def _wait_for_gateway(session: _Session, deadline: float) -> None:
    import httpx

    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{session.gateway_url}/-/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError as exc:
            last_error = exc
        if session.group.dead():
            break
        time.sleep(0.05)
    raise ServeStartupError(f"the gateway at {session.gateway_url} did not come up: {last_error}")


def _start_workers(
    session: _Session, spec: AppSpec, placements: dict[str, list[list[str]]]
) -> tuple[set[str], set[str], frozenset[str]]:
    """Workers for the spec's deployments: (the workers that serve it, old workers to stop once it is ready,
    the deployments whose running workers update in place or roll over).

    An application deployed again keeps a deployment's worker when the worker's own options are unchanged:
    its replicas then take the new spec in place (a lightweight change such as `user_config`) or its pool
    rolls them over one by one (new code). Otherwise a new worker starts and the old one stops once the new
    replicas serve, so there is no moment without replicas."""
    previous = session.specs.get(spec.name)
    old_names = session.workers.get(spec.name, set())
    alive = {p.name for p in session.group.processes if p.proc.poll() is None}
    names: set[str] = set()
    kept: set[str] = set()
    for dep_name, dep in spec.deployments.items():
        base = f"worker {spec.name}.{dep_name}"
        current = next((n for n in old_names if n == base or n.startswith(base + " #")), None)
        if (
            previous is not None
            and current in alive
            and dep_name in previous.deployments
            and previous.deployments[dep_name].worker_options() == dep.worker_options()
        ):
            names.add(current)  # type: ignore[arg-type]
            kept.add(dep_name)
            continue
        taken = {p.name for p in session.group.processes}
        proc_name, generation = base, 1
        while proc_name in taken:
            generation += 1
            proc_name = f"{base} #{generation}"
        command = worker_command(spec.name, dep_name, placements.get(dep_name))
        session.group.start(proc_name, command, env=redis_env(session.redis_url))
        names.add(proc_name)
    return names, old_names - names, frozenset(kept)


def worker_grace_s(spec: AppSpec) -> float:
    """How long a stopping worker of this application may take: its replicas' longest
    graceful_shutdown_timeout_s, plus time for the pool to hand back and for Celery to exit."""
    longest = max(
        (float(d.config.get("graceful_shutdown_timeout_s") or 0) for d in spec.deployments.values()), default=0
    )
    return longest + 15.0


def check_per_node_limits(spec: AppSpec) -> None:
    """`run` starts each deployment's replicas on this one machine: more than `max_replicas_per_node` can never
    start, so say so now instead of waiting for them."""
    from celery_serve.exceptions import DeploymentConfigError

    for dep in spec.deployments.values():
        limit, count = dep.config.get("max_replicas_per_node"), start_replicas(dep.config)
        if limit is not None and count > int(limit):
            raise DeploymentConfigError(
                f"deployment '{dep.name}' starts {count} replicas but max_replicas_per_node={limit}, and run() "
                "places every replica on this machine; lower num_replicas, or run workers on more machines "
                "(celery-serve deploy + celery-serve worker on each)"
            )


def _embedded_port() -> int | None:
    """`SERVE_REDIS_PORT`: give the embedded Redis a TCP port on loopback too (default: its unix socket only)."""
    value = os.environ.get("SERVE_REDIS_PORT")
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ServeError(f"SERVE_REDIS_PORT must be a port number, got {value!r}") from None


def plan_gpus(spec: AppSpec, devices: list[str] | None = None) -> dict[str, list[list[str]]]:
    """Place every GPU deployment's replicas on this machine's GPUs together, so that fractional
    deployments share devices without oversubscribing them. Deployments left out run where their worker
    decides (CPU fallback, or a clear error)."""
    from celery_serve.workers.gpus import PlacementError, discover_devices, plan_placement

    gpu_deployments = [d for d in spec.deployments.values() if float(d.config.get("num_gpus") or 0) > 0]
    if not gpu_deployments:
        return {}
    devices = discover_devices() if devices is None else devices
    used: dict[str, float] = {}
    plans: dict[str, list[list[str]]] = {}
    for dep in gpu_deployments:
        num_gpus = float(dep.config["num_gpus"])
        if not devices:
            if dep.config.get("allow_cpu_fallback"):
                continue
            raise PlacementError(
                f"deployment '{dep.name}' needs GPUs (num_gpus={num_gpus}) but this machine has none "
                "(nvidia-smi finds no device; SERVE_GPU_DEVICES can name them); for development, set "
                "allow_cpu_fallback=True on the deployment to run it on the CPU"
            )
        try:
            plan = plan_placement(start_replicas(dep.config), num_gpus, devices, used)
        except PlacementError:
            if dep.config.get("allow_cpu_fallback"):
                continue
            raise
        for replica_devices in plan:
            for device in replica_devices:
                used[device] = used.get(device, 0.0) + min(num_gpus, 1.0)
        plans[dep.name] = plan
    return plans


def wait_until_ready(session: _Session, spec: AppSpec, timeout_s: float, rolling: frozenset[str] = frozenset()) -> None:
    """Wait for every deployment's replicas of this spec version, then for the gateway to route to it.

    For the deployments in `rolling` (updated by the workers already serving them), also until no replica of
    an older version is left: in place, or replaced by the pool's rollout."""
    client = sync_client(session.redis_url)
    deadline = time.monotonic() + timeout_s
    pending = dict(spec.deployments)
    while pending:
        for name, dep in list(pending.items()):
            error = client.get(_keys.deployment_error(spec.name, name))
            if error:
                raise ServeStartupError(f"deployment '{name}' failed to start: {_text(error)}")
            needed = start_replicas(dep.config)
            if (
                ready_replicas(client, spec, name) >= needed
                and (needed > 0 or worker_registered(client, spec.name, name))
                and (name not in rolling or not older_replicas(client, spec, name))
            ):
                del pending[name]
        mine = session.workers.get(spec.name, set()) | {"gateway", "redis"}
        dead = [p.name for p in session.group.dead() if p.name in mine]
        if dead:
            raise ServeStartupError(f"{', '.join(dead)} exited during start-up; see its log above")
        if time.monotonic() > deadline:
            raise ServeStartupError(
                f"deployments {sorted(pending)} of '{spec.name}' were not ready within {timeout_s:.0f}s"
            )
        if pending:
            time.sleep(0.05)
    _wait_for_route(session, spec, deadline)


def ready_replicas(client: Any, spec: AppSpec, deployment: str) -> int:
    """Replicas of this deployment that run this spec version and are alive."""
    entries = client.hgetall(_keys.replicas(spec.name, deployment))
    beats = _keys.heartbeats(spec.name, deployment)
    now = time.time()
    count = 0
    for rid, raw in entries.items():
        info = json.loads(raw)
        if info.get("deployed_at") == spec.deployed_at:
            alive_until = client.zscore(beats, rid)
            count += alive_until is not None and float(alive_until) > now
    return count


def older_replicas(client: Any, spec: AppSpec, deployment: str) -> int:
    """Live replicas of this deployment that still run an older version of the spec."""
    alive = _apps.alive_replicas(client, spec.name, deployment)
    entries = client.hgetall(_keys.replicas(spec.name, deployment))
    return sum(
        1
        for rid, raw in entries.items()
        if rid.decode() in alive and json.loads(raw).get("deployed_at") != spec.deployed_at
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def worker_registered(client: Any, app: str, deployment: str) -> bool:
    """Is a live worker registered for the deployment? (A deployment that starts at zero replicas is ready
    once its worker can be grown.)"""
    for raw in client.hvals(_keys.WORKERS):
        info = json.loads(raw)
        if (info.get("app"), info.get("deployment")) == (app, deployment) and client.exists(
            _keys.worker_alive(info["hostname"])
        ):
            return True
    return False


FLOWER_START_S = 30.0  # Flower imports Celery and Tornado, then asks the workers for their state


def start_flower(
    port: int | None = 5555, address: str = "127.0.0.1", basic_auth: str | None = None, *, auth: bool = True
) -> str:
    """Start Flower for this session's Redis (once) and wait until it answers; returns its URL.

    Flower requires authentication: `basic_auth` (`user:password`, several separated by commas), else
    `$FLOWER_BASIC_AUTH`, else credentials generated once and kept in `.serve/flower-credentials` (0600);
    `auth=False` turns it off. It binds to loopback unless told otherwise, and the session's replicas send
    task events from the moment it starts, so it shows the requests of its first seconds too.
    `ServeStartupError` if it exits or does not answer in time (it is then stopped, and serving goes on
    without it)."""
    credentials = flower_auth.resolve(basic_auth, auth=auth)
    with _lock:
        if _session is None:
            raise ServeError("start_flower() needs a running application: call run() first")
        if _session.flower_url is not None:
            return _session.flower_url
        session = _session
        port = port or free_port(address if address not in ("", "0.0.0.0") else "127.0.0.1")
        env = redis_env(session.redis_url, {"FLOWER_BASIC_AUTH": credentials.basic_auth or ""})
        if not credentials.basic_auth:
            env.pop("FLOWER_BASIC_AUTH")
            logger.warning("Flower runs WITHOUT authentication on %s:%s (asked for)", address, port)
        _ask_for_task_events(session.redis_url)
        managed = session.group.start("flower", flower_command(port, address), env=env)
        url = f"http://{address if address not in ('', '0.0.0.0') else '127.0.0.1'}:{port}"
    if not _answers_http(url, managed, FLOWER_START_S):
        with _lock:
            session.group.stop({"flower"})
        raise ServeStartupError(
            f"Flower did not start on {address}:{port} (exit code {managed.proc.returncode}); serving goes on "
            "without it (see its log above; --no-flower skips it)"
        )
    with _lock:
        session.flower_url = url
        session.flower_credentials = credentials
        state.save(session.record())
    return url


def _ask_for_task_events(redis_url: str) -> None:
    """Replicas send task events only while a monitor asks (see `celery_serve.workers.events`); Flower asks
    only once it has started and polled the workers. Asking now, for it, means the requests of its first
    seconds reach it too (its own `enable_events` keeps the flag alive from then on)."""
    from celery_serve.workers.worker import TASK_EVENTS_TTL_S

    sync_client(redis_url).set(_keys.TASK_EVENTS, 1, ex=TASK_EVENTS_TTL_S)


def _answers_http(url: str, managed: ManagedProcess, timeout_s: float) -> bool:
    """Does the process answer HTTP at `url` (any status: Flower asks for credentials) before it exits?"""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and managed.proc.poll() is None:
        try:
            httpx.get(url + "/healthcheck", timeout=1.0)
            return True
        except httpx.HTTPError:
            time.sleep(0.1)
    return False


_SCALER_RESTART_S = 10.0


def essential_dead(session: _Session) -> list[ManagedProcess]:
    """The processes serving needs (Redis, gateway, workers) that have exited. A scaler that exits is
    started again (serving goes on at the current size meanwhile, and the new one picks up from Redis);
    Flower exiting (its port taken, say) is reported once and left so."""
    dead = []
    for proc in session.group.dead():
        if proc.name == "flower":
            logger.warning(
                "Flower exited with code %s (is its port taken?); serving goes on without it", proc.proc.returncode
            )
            session.group.processes.remove(proc)
            session.flower_url = None
        elif proc.name == "scaler":
            if time.monotonic() - session.scaler_died_at < _SCALER_RESTART_S:
                continue
            logger.warning("the scaler exited with code %s; starting it again", proc.proc.returncode)
            session.group.processes.remove(proc)
            session.scaler_died_at = time.monotonic()
            session.group.start("scaler", scaler_command(), env=redis_env(session.redis_url))
        else:
            dead.append(proc)
    return dead


DELETE_WAIT_S = 60.0


def delete(name: str, _blocking: bool = True) -> None:
    """Remove an application, as Ray's `serve.delete`: its routes answer 404 at once, requests still queued
    for it end with `DeploymentNotFoundError`, and its replicas stop (finishing what they run). With
    `_blocking` (the default) it returns once its replicas are gone. An application whose run stopped a
    moment ago (its callers get 503 "stopped") is removed for good: 404 from then on. `DeploymentNotFoundError`
    if no such application is deployed."""
    url = redis_url()
    client = sync_client(url)
    spec = _apps.delete_application(client, name)
    if spec is None:  # only a stopped run's note was left
        return
    with _lock:
        session = _session
        names = session.workers.pop(name, set()) if session is not None else set()
        if session is not None:
            session.specs.pop(name, None)
    if session is not None and session.gateway_url:
        _wait_route_gone(session.gateway_url, spec.route_prefix)
    if session is not None and names:
        grace = worker_grace_s(spec)
        if _blocking:
            session.group.stop(names, grace)
        else:  # the replicas finish what they run meanwhile; status says DELETING until they are gone
            threading.Thread(target=session.group.stop, args=(names, grace), daemon=True).start()
        state.save(session.record())
    if _blocking:
        deadline = time.monotonic() + DELETE_WAIT_S
        while _apps._live_replicas(client, name, list(spec.deployments)) and time.monotonic() < deadline:
            time.sleep(0.1)
        _apps.fail_queued(client, name, sorted({d.queue for d in spec.deployments.values()}))


def _wait_route_gone(gateway_url: str, prefix: str, timeout_s: float = 5.0) -> None:
    """Until the gateway no longer routes `prefix` (it hears of the change on pub/sub, within milliseconds)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if prefix not in httpx.get(f"{gateway_url}/-/routes", timeout=2.0).json():
                return
        except (httpx.HTTPError, ValueError):
            return  # no gateway to wait for
        time.sleep(0.02)


def _wait_for_route(session: _Session, spec: AppSpec, deadline: float) -> None:
    url = f"{session.gateway_url}/-/traffic"
    last_error: Exception | None = None
    import httpx  # here, not at module level: replicas import this package and never need httpx

    with httpx.Client(timeout=2.0) as http:
        while time.monotonic() < deadline:
            try:
                # the gateway knows the application on its prefix (its share may be 0: a new version beside
                # another one takes traffic once a split gives it some)
                if spec.name in http.get(url).json().get(spec.route_prefix, {}):
                    return
            except (httpx.HTTPError, ValueError) as exc:
                last_error = exc
            if session.group.dead():
                break
            time.sleep(0.05)
    raise ServeStartupError(f"the gateway at {session.gateway_url} did not come up: {last_error}")


def _block_until_interrupted() -> None:
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        shutdown()


def shutdown() -> None:
    """Stop every process `run` started (workers first, then the gateway, then an embedded Redis)."""
    global _session
    from celery_serve._runtime.local import shutdown_local

    shutdown_local()
    with _lock:
        session, _session = _session, None
    if session is None:
        return
    _context.reset()
    _context.set_redis_url(None)
    state.remove(session.record())
    session.group.stop({"scaler"})  # first, so it does not grow pools that are stopping
    try:
        for app_name in session.workers:
            # only what this run still owns: a later run that replaced an application keeps it; callers
            # meanwhile get 503 "stopped" (retry), not 404
            spec = session.specs.get(app_name)
            note = ""
            if spec is not None:
                queues = {d.queue for d in spec.deployments.values()}
                note = _stopped_apps.note(spec.route_prefix, spec.deployments, queues)
            delete_app(session.redis_url, app_name, owner_id=session.id, stopped_note=note)
    except Exception as exc:  # noqa: BLE001 - Redis may already be gone; stopping matters more
        logger.warning("could not remove application specs from Redis: %s", exc)
    if session.beat is not None:
        session.beat.stop()
    session.group.stop(grace_s=max((worker_grace_s(s) for s in session.specs.values()), default=0.0))


def redis_url() -> str:
    """The Redis URL this process deployed to (or REDIS_URL)."""
    return _session.redis_url if _session else _context.redis_url()
