"""The `celery-serve` command line. Thin: each subcommand parses, then calls functions tests call too.

One parser; the subcommands live in modules by what they do, each adding its own with `register()`:
`serving` (run, deploy), `processes` (gateway, worker, scaler, flower), `operations` (status, delete),
`dlq` (dead letters).
"""

from __future__ import annotations

import argparse
import sys

import redis.exceptions

from celery_serve import __version__
from celery_serve._cli import dlq, operations, processes, serving
from celery_serve._cli.common import HelpFormatter
from celery_serve._runtime import logs
from celery_serve._runtime.logs import redact
from celery_serve.exceptions import ServeError

_COMMANDS = (serving, processes, operations, dlq)

_DESCRIPTION = """\
Serve Ray Serve-style applications on Redis queues and Celery worker pools.

  celery-serve run MODULE:APP       everything on this machine (embedded Redis unless --redis-url)
  celery-serve deploy MODULE:APP    write the application's spec to Redis, nothing else
  celery-serve gateway              the HTTP gateway alone
  celery-serve worker -d NAME       one deployment's worker pool alone
  celery-serve scaler               the autoscaler alone
  celery-serve flower               Flower, Celery's monitor
  celery-serve status [--json]      what every deployment is doing
  celery-serve delete NAME          remove an application
  celery-serve shutdown             stop the run started from this folder
  celery-serve dlq list             requests given up on (list, show, replay, purge)

Without --redis-url, status, delete and shutdown act on the run started from this folder.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="celery-serve", description=_DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"celery-serve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    return parser


def _component(args: argparse.Namespace) -> str:
    """How this process is named in its log lines: the command, and for a worker its deployment."""
    if args.command == "worker":
        return f"worker {args.name}.{args.deployment}"
    return str(args.command)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(args.log_level, _component(args), args.log_format, access_log=getattr(args, "access_log", None))
    try:
        return int(args.func(args) or 0)
    except ServeError as exc:
        print(f"celery-serve: {redact(str(exc))}", file=sys.stderr)
        return 2
    except redis.exceptions.RedisError as exc:  # Redis went away mid-command: one line, not a traceback
        print(f"celery-serve: Redis error: {redact(str(exc))}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
