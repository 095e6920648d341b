"""Run a test module's applications into the session's serving processes, together, and remove them after."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from tests.conftest import STARTUP_TIMEOUT_S, Served


@contextmanager
def served_apps(served: Served, apps: dict[str, tuple[Any, str]]) -> Iterator[dict[str, Any]]:
    """name -> (application, route prefix); yields name -> handle. Started in parallel (start-up is the slow
    part), stopped and deleted at the end, leaving the session's other applications alone."""
    from celery_serve import run
    from celery_serve._runtime import serve as _serve

    try:
        with ThreadPoolExecutor(len(apps)) as pool:
            futures = {
                name: pool.submit(run, app, name=name, route_prefix=prefix, startup_timeout_s=STARTUP_TIMEOUT_S)
                for name, (app, prefix) in apps.items()
            }
            handles = {name: future.result() for name, future in futures.items()}
        yield handles
    finally:
        session = _serve._session
        if session is not None:
            names = set().union(*(session.workers.pop(name, set()) for name in apps))
            for managed in session.group.processes:  # SIGTERM them all first: they stop side by side
                if managed.name in names and managed.proc.poll() is None:
                    managed.proc.send_signal(signal.SIGTERM)
            session.group.stop(names)
            for name in apps:
                _serve.delete_app(served.redis_url, name)
