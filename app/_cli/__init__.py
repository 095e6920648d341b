"""The `celery-serve` command line. Thin: each subcommand parses, then calls functions tests call too.

One parser; the subcommands live in modules by what they do, each adding its own with `register()`:
`serving` (run, deploy), `processes` (gateway, worker, scaler), `operations` (status, delete).
"""

from __future__ import annotations

import argparse
import logging
import sys

from celery_serve import __version__
from celery_serve._cli import operations, processes, serving
from celery_serve._cli.common import HelpFormatter
from celery_serve.exceptions import ServeError

_COMMANDS = (serving, processes, operations)

_DESCRIPTION = """\
Serve Ray Serve-style applications on Redis queues and Celery worker pools.

  celery-serve run MODULE:APP       everything on this machine (embedded Redis unless --redis-url)
  celery-serve deploy MODULE:APP    write the application's spec to Redis, nothing else
  celery-serve gateway              the HTTP gateway alone
  celery-serve worker -d NAME       one deployment's worker pool alone
  celery-serve scaler               the autoscaler alone
  celery-serve status [--json]      what every deployment is doing
  celery-serve delete NAME          remove an application
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="celery-serve", description=_DESCRIPTION, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"celery-serve {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in _COMMANDS:
        module.register(sub)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except ServeError as exc:
        print(f"celery-serve: {exc}", file=sys.stderr)
        return 2


__all__ = ["build_parser", "main"]
