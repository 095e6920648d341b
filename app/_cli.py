"""The `celery-serve` command. Thin: it parses arguments and calls functions tests call too.

celery-serve run MODULE:APP       everything on this machine (embedded Redis unless REDIS_URL)
celery-serve deploy MODULE:APP    write the application's spec to Redis, nothing else
celery-serve gateway              the HTTP gateway alone, against REDIS_URL
celery-serve worker               one deployment's worker pool alone, against REDIS_URL
celery-serve scaler               the autoscaler alone, against REDIS_URL
celery-serve status [--json]      every deployment's replicas, queue, in-flight, throughput, errors
celery-serve delete NAME          remove an application
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import sys
import time
from types import FrameType
from typing import Any

from celery_serve.exceptions import DeploymentConfigError, ServeError


def import_application(path: str) -> Any:
    """Import `module:attribute` (default attribute `app`) with the current directory importable."""
    module_name, _, attr = path.partition(":")
    attr = attr or "app"
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise DeploymentConfigError(
            f"cannot import '{module_name}' ({exc}); run from the folder that holds it"
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise DeploymentConfigError(f"module '{module_name}' has no attribute '{attr}'") from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def cmd_run(args: argparse.Namespace) -> int:
    from celery_serve._runtime import serve as _serve

    os.environ.setdefault("SERVE_LOG_LEVEL", args.log_level)
    application = import_application(args.target)
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        _serve.run(
            application,
            name=args.name,
            route_prefix=args.route_prefix,
            host=args.host,
            port=args.port,
            redis_url=args.redis_url,
            _source=args.target if ":" in args.target else f"{args.target}:app",
        )
        session = _serve._session
        assert session is not None
        flower = None
        if not args.no_flower:
            flower = _serve.start_flower(args.flower_port, args.flower_address, args.flower_basic_auth)
        spec_prefix = args.route_prefix or "/"
        print(f"celery-serve: application '{args.name}' from {args.target}", flush=True)
        route = "" if spec_prefix == "/" else spec_prefix
        print(f"  HTTP      {session.gateway_url}{route}/  (docs: {session.gateway_url}/docs)", flush=True)
        embedded = "" if (args.redis_url or os.environ.get("REDIS_URL")) else "  (embedded)"
        print(f"  Redis     {session.redis_url}{embedded}", flush=True)
        print(f"  workers   {', '.join(sorted(session.workers.get(args.name, [])))}", flush=True)
        if flower:
            print(f"  Flower    {flower}/", flush=True)
        print(f"  metrics   {session.gateway_url}/metrics  (celery-serve status for a table)", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        while True:
            dead = _serve.essential_dead(session)
            if dead:
                print(
                    f"celery-serve: {dead[0].name} exited with code {dead[0].proc.returncode}; stopping",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.5)
    except (KeyboardInterrupt, _Stop):
        print("celery-serve: stopping...", flush=True)
        return 0
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        _serve.shutdown()


def cmd_scaler(args: argparse.Namespace) -> int:
    from celery_serve.workers.scaler import run_scaler

    run_scaler(_require_redis(args))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from celery_serve._wire.connections import sync_client
    from celery_serve.status import read_snapshot, status_json, status_table

    snapshot = read_snapshot(sync_client(_require_redis(args)))
    print(status_json(snapshot) if args.json else status_table(snapshot))
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from celery_serve._runtime import serve as _serve
    from celery_serve._runtime.spec import build_spec

    spec = build_spec(import_application(args.target), args.name, args.route_prefix, source=_source(args.target))
    _serve.deploy_spec(_require_redis(args), spec)
    print(f"deployed '{spec.name}' ({', '.join(spec.deployments)}) at {spec.route_prefix}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from celery_serve._runtime import serve as _serve

    _serve.delete_app(_require_redis(args), args.name)
    return 0


def cmd_gateway(args: argparse.Namespace) -> int:
    from celery_serve.api.main import main as gateway_main

    gateway_main(
        [
            "--host",
            args.host,
            "--port",
            str(args.port),
            "--redis-url",
            _require_redis(args),
            "--log-level",
            args.log_level,
        ]
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    url = _require_redis(args)
    try:
        _run_worker(args, url)
    except ServeError as exc:
        from celery_serve._wire import keys as _keys
        from celery_serve._wire.connections import sync_client

        sync_client(url).set(_keys.deployment_error(args.app_name, args.deployment), str(exc), ex=60)
        raise
    return 0


def _run_worker(args: argparse.Namespace, url: str) -> None:
    from celery_serve.workers.gpus import parse_devices
    from celery_serve.workers.worker import run_worker

    if args.target:
        from celery_serve._runtime import serve as _serve
        from celery_serve._runtime.spec import build_spec

        _serve.deploy_spec(
            url,
            build_spec(import_application(args.target), args.app_name, args.route_prefix, source=_source(args.target)),
        )
    run_worker(
        url,
        args.app_name,
        args.deployment,
        replicas=args.replicas,
        log_level=args.log_level,
        devices=parse_devices(args.devices) if args.devices is not None else None,
        placement=json.loads(args.placement) if args.placement else None,
    )


def _source(target: str) -> str:
    return target if ":" in target else f"{target}:app"


def _require_redis(args: argparse.Namespace) -> str:
    url = args.redis_url or os.environ.get("REDIS_URL")
    if not url:
        raise ServeError("this command needs a Redis: pass --redis-url or set REDIS_URL")
    return str(url)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celery-serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--redis-url", default=None, help="Redis to use (default: $REDIS_URL)")
        p.add_argument("--log-level", default=os.environ.get("SERVE_LOG_LEVEL", "WARNING"))

    run = sub.add_parser("run", help="run an application and everything it needs on this machine")
    run.add_argument("target", help="MODULE:ATTRIBUTE of the application, e.g. examples.hello:app")
    run.add_argument("--name", default="default", help="application name (default: default)")
    run.add_argument("--route-prefix", default=None)
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8000)
    run.add_argument("--no-flower", action="store_true", help="do not start Flower")
    run.add_argument("--flower-port", type=int, default=5555)
    run.add_argument("--flower-address", default="127.0.0.1", help="Flower's bind address (default: loopback only)")
    run.add_argument(
        "--flower-basic-auth",
        default=os.environ.get("FLOWER_BASIC_AUTH"),
        help="user:password for Flower (default: $FLOWER_BASIC_AUTH); set it before binding beyond loopback",
    )
    common(run)
    run.set_defaults(func=cmd_run)

    deploy = sub.add_parser("deploy", help="write an application's spec to Redis")
    deploy.add_argument("target")
    deploy.add_argument("--name", default="default")
    deploy.add_argument("--route-prefix", default=None)
    common(deploy)
    deploy.set_defaults(func=cmd_deploy)

    delete = sub.add_parser("delete", help="remove an application from Redis")
    delete.add_argument("name")
    common(delete)
    delete.set_defaults(func=cmd_delete)

    gateway = sub.add_parser("gateway", help="run the HTTP gateway against an existing Redis")
    gateway.add_argument("--host", default=os.environ.get("SERVE_HOST", "127.0.0.1"))
    gateway.add_argument("--port", type=int, default=int(os.environ.get("SERVE_PORT", "8000")))
    common(gateway)
    gateway.set_defaults(func=cmd_gateway)

    scaler = sub.add_parser("scaler", help="run the autoscaler against an existing Redis")
    common(scaler)
    scaler.set_defaults(func=cmd_scaler, log_level=os.environ.get("SERVE_SCALER_LOG_LEVEL", "INFO"))

    status = sub.add_parser("status", help="show every deployment's replicas, queue depth, in-flight, throughput")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    common(status)
    status.set_defaults(func=cmd_status)

    worker = sub.add_parser("worker", help="run one deployment's worker pool against an existing Redis")
    worker.add_argument("target", nargs="?", help="MODULE:ATTRIBUTE to deploy first (optional)")
    worker.add_argument("--app-name", default="default")
    worker.add_argument("--deployment", required=True)
    worker.add_argument("--replicas", type=int, default=None, help="override num_replicas")
    worker.add_argument("--route-prefix", default=None)
    worker.add_argument("--devices", default=None, help="GPU ids this worker may use, e.g. 0,1 (default: all found)")
    worker.add_argument("--placement", default=None, help=argparse.SUPPRESS)  # per-replica devices, from `run`
    common(worker)
    worker.set_defaults(func=cmd_worker)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except ServeError as exc:
        print(f"celery-serve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
