"""Flower for a celery-serve deployment (`celery-serve flower`, which `celery-serve run` starts).

Flower is Celery's own monitor: it lists every deployment's worker (`<app>.<deployment>.<pid>@<host>`),
the queues they serve (their `active_queues` reply includes the deployment queue) and every request as a
task named `<app>.<deployment>.<method>`, from the task events replicas send (`celery_serve.workers.events`).
It binds to loopback unless told otherwise; set `FLOWER_BASIC_AUTH=user:password` (or `--flower-basic-auth`
on `run`) before exposing it.
"""

from __future__ import annotations

from celery_serve.workers.celery_app import make_celery


def run_flower(redis_url: str, port: int, address: str, log_level: str, extra_args: list[str] | None = None) -> int:
    """Run Flower in the foreground until SIGTERM; returns its exit code.

    Flower reads its other options (FLOWER_BASIC_AUTH, FLOWER_URL_PREFIX, ...) from the environment.
    Tornado's --logging only sets the level: the process's logging is already set up (one format).
    """
    celery = make_celery(redis_url)
    argv = ["--quiet", "flower", f"--port={port}", f"--address={address}", f"--logging={log_level.lower()}"]
    return int(celery.start([*argv, *(extra_args or [])]) or 0)
