"""Config files: `celery-serve build` writes one from code, `celery-serve config` prints the live one.

`celery-serve deploy FILE` and `celery-serve run FILE` read them (see `serving`); the schema is Ray Serve's
(see `celery_serve._runtime.config_file`).
"""

from __future__ import annotations

import argparse
import sys

from celery_serve._cli.common import (
    HelpFormatter,
    add_log_level,
    add_redis_url,
    find_run,
    import_application,
    resolve_redis,
    source_of,
)


def cmd_build(args: argparse.Namespace) -> int:
    from celery_serve._runtime.config_file import config_of, dump
    from celery_serve._runtime.spec import build_spec

    several = len(args.targets) > 1
    specs = []
    for index, target in enumerate(args.targets, start=1):
        name = f"app{index}" if several else args.name
        prefix = f"/{name}" if several else None
        specs.append(build_spec(import_application(target), name, prefix, source=source_of(target)))
    header = f"# Written by `celery-serve build {' '.join(args.targets)}`; deploy it with `celery-serve deploy FILE`."
    text = dump(config_of(specs), header)
    if args.output:
        with open(args.output, "w") as out:
            out.write(text)
        print(f"wrote {args.output} ({', '.join(s.name for s in specs)})", file=sys.stderr)
    else:
        print(text, end="")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from urllib.parse import urlparse

    from celery_serve._runtime.config_file import config_of, dump
    from celery_serve._runtime.spec import AppSpec
    from celery_serve._wire import keys as _keys
    from celery_serve._wire.connections import sync_client

    url = resolve_redis(args)
    specs = sorted((AppSpec.from_json(raw) for raw in sync_client(url).hvals(_keys.APPS)), key=lambda s: s.name)
    if args.name:
        specs = [s for s in specs if s.name == args.name]
    run = find_run(args)
    gateway = urlparse(run.gateway_url) if run is not None and run.gateway_url else None
    host, port = (gateway.hostname or "127.0.0.1", gateway.port or 8000) if gateway else ("127.0.0.1", 8000)
    print(dump(config_of(specs, host, port), "# The applications deployed now (celery-serve config)."), end="")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    build = sub.add_parser(
        "build",
        help="write a config file (Ray Serve's schema) for one or more applications",
        description="Import the applications and write a config file that deploys them as the code says; edit "
        "its per-deployment options to override the code, then `celery-serve deploy FILE`.",
        formatter_class=HelpFormatter,
    )
    build.add_argument("targets", nargs="+", metavar="MODULE:APP", help="the applications")
    build.add_argument("--output", "-o", default=None, help="the file to write (default: standard output)")
    build.add_argument("--name", "-n", default="default", help="the application's name (one application)")
    add_log_level(build)
    build.set_defaults(func=cmd_build)

    config = sub.add_parser(
        "config",
        help="print the live applications as a config file",
        description="Without --redis-url: the service `celery-serve run` started from this folder.",
        formatter_class=HelpFormatter,
    )
    config.add_argument("--name", "-n", default=None, help="only this application")
    add_redis_url(config)
    add_log_level(config)
    config.set_defaults(func=cmd_config)
