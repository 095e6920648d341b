"""The long-running parts, one per command, for running across machines: `gateway`, `worker`, `scaler`."""

from __future__ import annotations

import argparse
import json

from celery_serve._cli.common import (
    HelpFormatter,
    add_access_log,
    add_http_options,
    add_log_level,
    add_name,
    add_redis_url,
    add_route_prefix,
    env_default,
    import_application,
    require_redis,
    source_of,
)
from celery_serve.exceptions import ServeError


def cmd_gateway(args: argparse.Namespace) -> int:
    from celery_serve._runtime.settings import ServeSettings
    from celery_serve.api.main import serve

    settings = ServeSettings(host=args.host, port=args.port, log_level=args.log_level)
    settings.http_middlewares = args.http_middlewares or settings.http_middlewares
    settings.cors_allow_origins = args.cors_allow_origins or settings.cors_allow_origins
    settings.redis_url = require_redis(args)
    serve(settings)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    url = require_redis(args)
    try:
        _run_worker(args, url)
    except ServeError as exc:
        from celery_serve._wire import keys as _keys
        from celery_serve._wire.connections import sync_client

        sync_client(url).set(_keys.deployment_error(args.name, args.deployment), str(exc), ex=60)
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
            build_spec(import_application(args.target), args.name, args.route_prefix, source=source_of(args.target)),
        )
    run_worker(
        url,
        args.name,
        args.deployment,
        replicas=args.replicas,
        log_level=args.log_level,
        devices=parse_devices(args.devices) if args.devices is not None else None,
        placement=json.loads(args.placement) if args.placement else None,
    )


def cmd_scaler(args: argparse.Namespace) -> int:
    from celery_serve.workers.scaler import run_scaler

    run_scaler(require_redis(args))
    return 0


def cmd_flower(args: argparse.Namespace) -> int:
    import os
    import sys

    from celery_serve._runtime import flower_auth
    from celery_serve.workers.flower import run_flower

    url = require_redis(args)
    credentials = flower_auth.resolve(auth=not args.no_auth)  # $FLOWER_BASIC_AUTH, else generated once
    if credentials.basic_auth is None:
        os.environ.pop("FLOWER_BASIC_AUTH", None)
        print("celery-serve: Flower runs WITHOUT authentication (--no-auth)", file=sys.stderr, flush=True)
    else:
        os.environ["FLOWER_BASIC_AUTH"] = credentials.basic_auth  # Flower reads its options from FLOWER_*
        if credentials.source != "given":
            print(f"celery-serve: Flower user {credentials.user}, password in {credentials.source}", file=sys.stderr)
    return run_flower(url, args.port, args.address, args.log_level)


def register(sub: argparse._SubParsersAction) -> None:
    gateway = sub.add_parser(
        "gateway", help="run the HTTP gateway against an existing Redis", formatter_class=HelpFormatter
    )
    gateway.add_argument("--host", default=env_default("SERVE_HOST", "127.0.0.1"), help="address ($SERVE_HOST)")
    gateway.add_argument(
        "--port", type=int, default=int(env_default("SERVE_PORT", "8000") or 8000), help="port ($SERVE_PORT)"
    )
    add_http_options(gateway)
    add_redis_url(gateway)
    add_log_level(gateway)
    add_access_log(gateway)
    gateway.set_defaults(func=cmd_gateway)

    worker = sub.add_parser(
        "worker", help="run one deployment's worker pool against an existing Redis", formatter_class=HelpFormatter
    )
    worker.add_argument("target", nargs="?", metavar="MODULE:APP", help="deploy this application first (optional)")
    worker.add_argument("--deployment", "-d", required=True, help="the deployment whose replicas this pool runs")
    add_name(worker)
    worker.add_argument("--replicas", type=int, default=None, help="replicas to start (default: the deployment's)")
    add_route_prefix(worker)
    worker.add_argument(
        "--devices",
        default=env_default("SERVE_GPU_DEVICES"),
        help="GPU ids this worker may use, e.g. 0,1 ($SERVE_GPU_DEVICES; default: all nvidia-smi finds)",
    )
    worker.add_argument("--placement", default=None, help=argparse.SUPPRESS)  # per-replica devices, from `run`
    add_redis_url(worker)
    add_log_level(worker)
    worker.set_defaults(func=cmd_worker)

    scaler = sub.add_parser(
        "scaler", help="run the autoscaler against an existing Redis", formatter_class=HelpFormatter
    )
    add_redis_url(scaler)
    add_log_level(scaler, env="SERVE_SCALER_LOG_LEVEL", fallback="INFO")
    scaler.set_defaults(func=cmd_scaler)

    flower = sub.add_parser(
        "flower",
        help="run Flower, Celery's monitor, against an existing Redis",
        description="Flower shows every deployment's workers and every request as a task, so it asks for "
        "credentials: $FLOWER_BASIC_AUTH (user:password), else a password generated once and kept in "
        ".serve/flower-credentials (0600). --no-auth turns that off.",
        formatter_class=HelpFormatter,
    )
    flower.add_argument(
        "--port", type=int, default=int(env_default("FLOWER_PORT", "5555") or 5555), help="port ($FLOWER_PORT)"
    )
    flower.add_argument(
        "--address", default=env_default("FLOWER_ADDRESS", "127.0.0.1"), help="bind address ($FLOWER_ADDRESS)"
    )
    flower.add_argument(
        "--no-auth", action="store_true", help="serve Flower without authentication (it shows every request)"
    )
    add_redis_url(flower)
    add_log_level(flower)
    flower.set_defaults(func=cmd_flower)
