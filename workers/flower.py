"""Flower for a celery-serve deployment: `python -m celery_serve.workers.flower --redis-url URL [--port 5555]`.

Flower is Celery's own monitor: it lists every deployment's worker (`<app>.<deployment>.<pid>@<host>`),
the queues they serve (their `active_queues` reply includes the deployment queue) and every request as a
task named `<app>.<deployment>.<method>`, from the task events replicas send (`celery_serve.workers.events`).
Started by `celery-serve run` (`--no-flower` to skip). It binds to loopback unless told otherwise; set
`FLOWER_BASIC_AUTH=user:password` (or `--flower-basic-auth`) before exposing it.
"""

from __future__ import annotations

import argparse
import os
import sys

from celery_serve.workers.celery_app import make_celery


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="celery-serve flower")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL"))
    parser.add_argument("--port", type=int, default=5555)
    parser.add_argument("--address", default="127.0.0.1")
    args, flower_args = parser.parse_known_args(argv)
    if not args.redis_url:
        print("celery-serve flower: pass --redis-url or set REDIS_URL", file=sys.stderr)
        return 2
    celery = make_celery(args.redis_url)
    # Flower reads its other options (FLOWER_BASIC_AUTH, FLOWER_URL_PREFIX, ...) from the environment.
    return int(
        celery.start(["--quiet", "flower", f"--port={args.port}", f"--address={args.address}", *flower_args]) or 0
    )


if __name__ == "__main__":
    sys.exit(main())
