"""Looking at and changing what runs: `status`, `delete` and `shutdown`.

Without `--redis-url` (or `REDIS_URL`) they act on the service that `celery-serve run` (or `serve.run()`)
started from this folder, or on this environment's only one (see `celery_serve._runtime.state`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time

from celery_serve._cli.common import HelpFormatter, add_log_level, add_redis_url, find_run, resolve_redis
from celery_serve.exceptions import ServeError

_SHUTDOWN_WAIT_S = 60.0  # a run stops its workers first, and each may finish what it holds


def cmd_status(args: argparse.Namespace) -> int:
    from celery_serve._runtime.apps import serve_status, status_lines
    from celery_serve._wire.connections import sync_client
    from celery_serve.status import read_snapshot, status_json, status_table

    client = sync_client(resolve_redis(args))
    snapshot = read_snapshot(client)
    overview = serve_status(client, snapshot)
    if args.json:
        data = json.loads(status_json(snapshot))
        data["applications"] = overview.to_dict()["applications"]
        print(json.dumps(data, indent=2))
    else:
        print("\n".join([*status_lines(overview), "", status_table(snapshot)]))
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    from celery_serve._runtime.apps import delete_application
    from celery_serve._wire.connections import sync_client

    url = resolve_redis(args)
    delete_application(sync_client(url), args.app)  # DeploymentNotFoundError names what is deployed
    print(f"deleted application '{args.app}' (its replicas stop once they finish what they run)")
    return 0


def cmd_shutdown(args: argparse.Namespace) -> int:
    from celery_serve._runtime import state

    run = find_run(args)
    if run is None:
        raise ServeError(
            "no celery-serve run found in this folder or this environment (nothing to shut down); "
            "to remove one application from a Redis, use `celery-serve delete NAME --redis-url URL`"
        )
    if run.kind == "cli":
        # The run stops its workers (they finish or hand back what they hold), then the gateway and Redis.
        os.kill(run.pid, signal.SIGTERM)
        if not _wait_gone([run.pid], _SHUTDOWN_WAIT_S):
            raise ServeError(f"celery-serve run (pid {run.pid}) did not stop within {_SHUTDOWN_WAIT_S:.0f}s")
    else:
        # `serve.run()` inside a program: stop what it started, newest first, and leave the program alone.
        for child in reversed(run.children):
            pid = int(str(child["pid"]))
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            _wait_gone([pid], _SHUTDOWN_WAIT_S)
        state.remove(run)
    print(f"shut down the celery-serve run of pid {run.pid} ({', '.join(run.apps) or 'no applications'})")
    return 0


def _wait_gone(pids: list[int], timeout_s: float) -> bool:
    from celery_serve._runtime.state import pid_alive

    deadline = time.monotonic() + timeout_s
    while any(pid_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def register(sub: argparse._SubParsersAction) -> None:
    status = sub.add_parser(
        "status",
        help="every deployment's replicas, queue depth, in flight, throughput and errors",
        description="Without --redis-url: the service `celery-serve run` started from this folder.",
        formatter_class=HelpFormatter,
    )
    status.add_argument("--json", action="store_true", help="machine-readable output")
    add_redis_url(status)
    add_log_level(status)
    status.set_defaults(func=cmd_status)

    delete = sub.add_parser(
        "delete",
        help="remove an application (its routes answer 404 at once)",
        description="Without --redis-url: from the service `celery-serve run` started from this folder.",
        formatter_class=HelpFormatter,
    )
    delete.add_argument("app", metavar="NAME", help="the application's name")
    add_redis_url(delete)
    add_log_level(delete)
    delete.set_defaults(func=cmd_delete)

    shutdown = sub.add_parser(
        "shutdown",
        help="stop the service `celery-serve run` (or serve.run()) started from this folder",
        description="Stop the service that `celery-serve run` started from this folder (or `serve.run()` in a "
        "program of this environment): workers finish or hand back what they hold, then the gateway and Redis.",
        formatter_class=HelpFormatter,
    )
    add_redis_url(shutdown)
    add_log_level(shutdown)
    shutdown.set_defaults(func=cmd_shutdown)
