"""Looking at and changing what runs: `status`, `delete`, `traffic` and `shutdown`.

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
    spec = delete_application(sync_client(url), args.app)  # DeploymentNotFoundError names what is deployed
    if spec is None:
        print(f"deleted application '{args.app}' (its run had stopped; requests still queued for it were ended)")
    else:
        print(f"deleted application '{args.app}' (its replicas stop once they finish what they run)")
    return 0


def cmd_traffic(args: argparse.Namespace) -> int:
    from celery_serve._runtime.traffic import get_traffic, set_traffic

    url = resolve_redis(args)
    if args.clear:
        set_traffic(args.route, None, redis_url=url)
        print(f"removed the traffic split of {args.route}: the application deployed there first takes it all")
        return 0
    if not args.weights:
        print(get_traffic(args.route, redis_url=url) or f"no traffic split on {args.route}")
        return 0
    weights: dict[str, float] = {}
    for item in args.weights:
        name, sep, value = item.partition("=")
        try:
            weights[name] = float(value) if sep else float("nan")
        except ValueError:
            weights[name] = float("nan")
        if not sep or weights[name] != weights[name]:
            raise ServeError(f"weights are given as APP=WEIGHT (e.g. v1=90 v2=10), got {item!r}")
    set_traffic(args.route, weights, redis_url=url)
    total = sum(weights.values())
    shares = ", ".join(f"{name} {100 * w / total:.1f}%" for name, w in weights.items())
    print(f"{args.route}: {shares} (gateways follow within a second)")
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

    traffic = sub.add_parser(
        "traffic",
        help="share a route's requests between applications deployed on it (canary, rollout, rollback)",
        description="e.g. `celery-serve traffic /model v1=90 v2=10`; without weights: show the split. Gateways "
        "follow a change within a second; requests already queued finish where they are.",
        formatter_class=HelpFormatter,
    )
    traffic.add_argument("route", metavar="ROUTE", help="the route prefix, e.g. /model")
    traffic.add_argument("weights", metavar="APP=WEIGHT", nargs="*", help="application names and their weights")
    traffic.add_argument("--clear", action="store_true", help="remove the split (the first application takes all)")
    add_redis_url(traffic)
    add_log_level(traffic)
    traffic.set_defaults(func=cmd_traffic)

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
