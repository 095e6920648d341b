"""`celery-serve run` (everything on this machine) and `celery-serve deploy` (the spec alone)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from types import FrameType

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
from celery_serve._wire.connections import redacted


class _Stop(Exception):
    pass


def _raise_stop(signum: int, _frame: FrameType | None) -> None:
    raise _Stop(signal.Signals(signum).name)


def cmd_run(args: argparse.Namespace) -> int:
    from celery_serve._runtime import embedded_redis
    from celery_serve._runtime import serve as _serve
    from celery_serve._runtime.launcher import check_port_free
    from celery_serve.exceptions import ServeError

    os.environ.setdefault("SERVE_LOG_LEVEL", args.log_level)
    if args.cors_allow_origins:  # the gateway reads them from its environment
        os.environ["SERVE_CORS_ALLOW_ORIGINS"] = args.cors_allow_origins
    if args.http_middlewares:
        os.environ["SERVE_HTTP_MIDDLEWARES"] = args.http_middlewares
    config_file = is_config_file(args.target)
    application = None if config_file else import_application(args.target)
    # Both ports are checked before anything starts, so a taken one costs no start-up and leaves nothing behind.
    check_port_free(args.host, args.port, "the gateway", "--port ")
    if not args.no_flower:
        check_port_free(args.flower_address, args.flower_port, "Flower", "--flower-port ")
    signal.signal(signal.SIGTERM, _raise_stop)
    try:
        if config_file:
            names = list(
                _serve.run_config(
                    args.target,
                    host=args.host,
                    port=args.port,
                    redis_url=args.redis_url,
                    replace=args.replace,
                    import_target=import_application,
                    _kind="cli",
                )
            )
        else:
            assert application is not None
            _serve.run(
                application,
                name=args.name,
                route_prefix=args.route_prefix,
                host=args.host,
                port=args.port,
                redis_url=args.redis_url,
                replace=args.replace,
                _source=source_of(args.target),
                _kind="cli",
            )
            names = [args.name]
        session = _serve._session
        assert session is not None
        flower = None
        if not args.no_flower:
            try:
                flower = _serve.start_flower(
                    args.flower_port, args.flower_address, args.flower_basic_auth, auth=not args.flower_no_auth
                )
            except ServeError as exc:
                print(f"celery-serve: {exc}", file=sys.stderr, flush=True)
        for name in names:
            spec_prefix = session.specs[name].route_prefix
            print(f"celery-serve: application '{name}' from {args.target}", flush=True)
            route = "" if spec_prefix == "/" else spec_prefix
            print(f"  HTTP      {session.gateway_url}{route}/  (docs: {session.gateway_url}/docs)", flush=True)
        if session.embedded is not None:
            print(f"  Redis     {session.embedded.describe()}  (embedded)", flush=True)
            for advisory in embedded_redis.known_vulnerabilities(session.embedded.binary.version):
                print(
                    f"  WARNING   redis-server {session.embedded.binary.version_text} predates the fix of "
                    f"{advisory}; install a patched redis-server or set SERVE_REDIS_SERVER",
                    flush=True,
                )
        else:
            print(f"  Redis     {redacted(session.redis_url)}", flush=True)
        workers = sorted(w for name in names for w in session.workers.get(name, []))
        print(f"  workers   {', '.join(workers)}", flush=True)
        credentials = session.flower_credentials
        if flower and credentials is not None:
            if credentials.basic_auth is None:
                print(f"  Flower    {flower}/  (NO authentication: --flower-no-auth)", flush=True)
            elif credentials.source == "given":
                print(f"  Flower    {flower}/  (user {credentials.user}, the password you gave)", flush=True)
            else:
                print(f"  Flower    {flower}/  (user {credentials.user}, password in {credentials.source})", flush=True)
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


def cmd_deploy(args: argparse.Namespace) -> int:
    from celery_serve._runtime import serve as _serve
    from celery_serve._runtime.spec import build_spec
    from celery_serve._wire.connections import wait_for_redis

    url = require_redis(args)
    if is_config_file(args.target):
        from celery_serve._runtime.config_file import ConfigFile

        specs = ConfigFile(args.target).specs(import_application)  # all checked before any is deployed
    else:
        target = import_application(args.target)
        specs = [build_spec(target, args.name, args.route_prefix, source=source_of(args.target))]
    wait_for_redis(url)
    for spec in specs:
        _serve.deploy_spec(url, spec, replace=args.replace)
        print(f"deployed '{spec.name}' ({', '.join(spec.deployments)}) at {spec.route_prefix}")
    return 0


def is_config_file(target: str) -> bool:
    """A config file path (YAML or JSON) rather than MODULE:APP."""
    return target.endswith((".yaml", ".yml", ".json"))


def _add_replace(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--replace",
        action="store_true",
        help="take over an application of the same name that another live run serves on this Redis",
    )


def register(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run",
        help="run an application and everything it needs on this machine",
        description="Start Redis (embedded, unless --redis-url or $REDIS_URL), the HTTP gateway, the scaler, "
        "Flower and one worker pool per deployment, and serve until Ctrl-C.",
        formatter_class=HelpFormatter,
    )
    run.add_argument(
        "target", metavar="MODULE:APP|FILE", help="the application to serve (examples.hello:app), or a config file"
    )
    add_name(run)
    add_route_prefix(run)
    run.add_argument("--host", default=env_default("SERVE_HOST", "127.0.0.1"), help="gateway address ($SERVE_HOST)")
    run.add_argument(
        "--port", type=int, default=int(env_default("SERVE_PORT", "8000") or 8000), help="gateway port ($SERVE_PORT)"
    )
    run.add_argument("--no-flower", action="store_true", help="do not start Flower")
    run.add_argument("--flower-port", type=int, default=5555, help="Flower's port")
    run.add_argument("--flower-address", default="127.0.0.1", help="Flower's bind address")
    run.add_argument(
        "--flower-basic-auth",
        default=env_default("FLOWER_BASIC_AUTH"),
        metavar="USER:PASSWORD",
        help="credentials for Flower ($FLOWER_BASIC_AUTH; default: generated once, kept in .serve/flower-credentials)",
    )
    run.add_argument(
        "--flower-no-auth", action="store_true", help="serve Flower without authentication (it shows every request)"
    )
    _add_replace(run)
    add_http_options(run)
    add_redis_url(run)
    add_log_level(run)
    add_access_log(run)
    run.set_defaults(func=cmd_run)

    deploy = sub.add_parser(
        "deploy",
        help="write an application's spec to Redis (workers and gateways pick it up)",
        formatter_class=HelpFormatter,
    )
    deploy.add_argument(
        "target", metavar="MODULE:APP|FILE", help="the application to deploy, or a config file of applications"
    )
    add_name(deploy)
    add_route_prefix(deploy)
    _add_replace(deploy)
    add_redis_url(deploy)
    add_log_level(deploy)
    deploy.set_defaults(func=cmd_deploy)
