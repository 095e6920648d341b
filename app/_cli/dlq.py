"""`celery-serve dlq list|show|replay|purge`: the requests given up on, and what to do with them."""

from __future__ import annotations

import argparse
import json
import time

from celery_serve._cli.common import HelpFormatter, add_log_level, add_redis_url, resolve_redis
from celery_serve.exceptions import ServeError


def _client(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from celery_serve._wire.connections import sync_client

    return sync_client(resolve_redis(args))


def cmd_list(args: argparse.Namespace) -> int:
    from celery_serve._wire.dead_letters import list_dead_letters

    entries = list_dead_letters(_client(args), args.app, args.deployment, limit=args.limit)
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
        return 0
    if not entries:
        print("no dead letters")
        return 0
    for e in entries:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at)) if e.at else "-"
        print(f"{when}  {e.app}.{e.deployment}  {e.job_id or '(no id)'}  deliveries={e.deliveries}  {e.reason}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from celery_serve._wire.dead_letters import find

    print(json.dumps(find(_client(args), args.job_id, args.app).to_dict(with_message=True), indent=2))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    from celery_serve._wire.dead_letters import find, list_dead_letters, replay

    client = _client(args)
    if args.all:
        entries = list_dead_letters(client, args.app, args.deployment)
    elif args.job_id:
        entries = [find(client, args.job_id, args.app)]
    else:
        raise ServeError("name a JOB_ID to replay (see `celery-serve dlq list`), or --all")
    for entry in entries:
        replay(client, entry)
    print(f"replayed {len(entries)} request(s)")
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    from celery_serve._wire.dead_letters import purge

    print(f"purged {purge(_client(args), args.app, args.deployment)} dead letter(s)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    dlq = sub.add_parser(
        "dlq",
        help="requests given up on (they killed their replica max_deliveries times, or could not be read)",
        description="Each dead letter keeps its whole message: inspect it, fix the cause, replay it.",
        formatter_class=HelpFormatter,
    )
    actions = dlq.add_subparsers(dest="dlq_command", required=True, metavar="ACTION")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        parser = actions.add_parser(name, help=help_text, formatter_class=HelpFormatter)
        add_redis_url(parser)
        add_log_level(parser)
        return parser

    listing = add("list", "list dead letters, newest first")
    listing.add_argument("app", nargs="?", metavar="APP", help="only this application")
    listing.add_argument("-d", "--deployment", help="only this deployment")
    listing.add_argument("--limit", type=int, default=1000, help="at most this many per deployment")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(func=cmd_list)

    show = add("show", "one dead letter, with its message")
    show.add_argument("job_id", metavar="JOB_ID")
    show.add_argument("--app", help="look only in this application")
    show.set_defaults(func=cmd_show)

    replaying = add("replay", "queue dead letters again (delivery count reset, same job id)")
    replaying.add_argument("job_id", nargs="?", metavar="JOB_ID")
    replaying.add_argument("--all", action="store_true", help="every dead letter (of --app / --deployment)")
    replaying.add_argument("--app", help="only this application")
    replaying.add_argument("-d", "--deployment", help="only this deployment")
    replaying.set_defaults(func=cmd_replay)

    purging = add("purge", "delete dead letters")
    purging.add_argument("app", nargs="?", metavar="APP", help="only this application")
    purging.add_argument("-d", "--deployment", help="only this deployment")
    purging.set_defaults(func=cmd_purge)
