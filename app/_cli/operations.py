"""Looking at and changing what runs: `status` and `delete`."""

from __future__ import annotations

import argparse

from celery_serve._cli.common import HelpFormatter, add_log_level, add_redis_url, require_redis


def cmd_status(args: argparse.Namespace) -> int:
    from celery_serve._wire.connections import sync_client
    from celery_serve.status import read_snapshot, status_json, status_table

    snapshot = read_snapshot(sync_client(require_redis(args)))
    print(status_json(snapshot) if args.json else status_table(snapshot))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from celery_serve._runtime import serve as _serve

    _serve.delete_app(require_redis(args), args.app)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser(
        "status",
        help="every deployment's replicas, queue depth, in flight, throughput and errors",
        formatter_class=HelpFormatter,
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    add_redis_url(status)
    add_log_level(status)
    status.set_defaults(func=cmd_status)

    delete = sub.add_parser("delete", help="remove an application", formatter_class=HelpFormatter)
    delete.add_argument("app", metavar="NAME", help="the application's name")
    add_redis_url(delete)
    add_log_level(delete)
    delete.set_defaults(func=cmd_delete)
