"""Health checks: the user's `check_health()` every `health_check_period_s`, as Ray Serve calls it.

A thread of the replica process drives the checks on the replica's event loop and waits for each with
`health_check_timeout_s` measured from the outside, so a check that raises, one that hangs and a replica
whose event loop is stuck all count the same. After `HEALTH_CHECK_FAILURES` failures in a row the replica
is unhealthy: it marks its deployment UNHEALTHY in Redis, hands back every request it holds (they go to
other replicas, or to its replacement) and exits with `EXIT_UNHEALTHY`, which its pool answers by starting
a replacement at once. The first replacement (any replica started after the failure) that passes a check
clears the mark.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from celery_serve._wire import lifecycle
from celery_serve._wire.connections import sync_client
from celery_serve.config import HEALTH_CHECK_FAILURES

logger = logging.getLogger(__name__)


class HealthMonitor(threading.Thread):
    """Calls `check_health` periodically; replaces the replica (by exiting) after repeated failures."""

    def __init__(
        self,
        url: str,
        app: str,
        deployment: str,
        replica_id: str,
        check: Callable[[], Any],
        loop: asyncio.AbstractEventLoop,
        hand_back: Callable[[], int],
        *,
        period_s: float,
        timeout_s: float,
        failures_allowed: int = HEALTH_CHECK_FAILURES,
        exit: Callable[[int], None] = os._exit,
    ) -> None:
        super().__init__(name="celery-serve-health", daemon=True)
        self.redis = sync_client(url)
        self.app, self.deployment, self.replica_id = app, deployment, replica_id
        self.check = check
        self.loop = loop
        self.hand_back = hand_back
        self.period_s, self.timeout_s = period_s, timeout_s
        self.failures_allowed = failures_allowed
        self.started_at = time.time()
        self.failures = 0
        self.stopping = threading.Event()
        self._exit = exit

    async def _call(self) -> None:
        result = self.check()
        if inspect.isawaitable(result):
            await result

    def check_once(self) -> str | None:
        """Run one check; None when healthy, otherwise why not."""
        future = asyncio.run_coroutine_threadsafe(self._call(), self.loop)
        try:
            future.result(timeout=self.timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return f"check_health() did not return within health_check_timeout_s={self.timeout_s:g}"
        except Exception as exc:  # noqa: BLE001 - any exception is a failed check, as in Ray
            return f"check_health() raised {type(exc).__name__}: {exc}"
        return None

    def run(self) -> None:
        while not self.stopping.wait(self.period_s):
            problem = self.check_once()
            if self.stopping.is_set():
                return
            if problem is None:
                self.failures = 0
                self._clear_mark()
                continue
            self.failures += 1
            logger.warning(
                "replica %s failed health check %d of %d: %s",
                self.replica_id,
                self.failures,
                self.failures_allowed,
                problem,
            )
            if self.failures >= self.failures_allowed:
                self._replace(problem)
                return

    def _clear_mark(self) -> None:
        """A replica started after the last failure is healthy: the deployment is no longer UNHEALTHY."""
        key = lifecycle.unhealthy(self.app, self.deployment)
        try:
            mark = lifecycle.read(self.redis.get(key))
            if mark is not None and float(mark.get("at") or 0) < self.started_at:
                self.redis.delete(key)
        except Exception as exc:  # noqa: BLE001 - the next passing check tries again
            logger.debug("could not clear the unhealthy mark: %s", exc)

    def _replace(self, problem: str) -> None:
        message = f"replica {self.replica_id} failed {self.failures} health checks in a row: {problem}"
        logger.error("%s; replacing it", message)
        try:
            lifecycle.mark_unhealthy(self.redis, self.app, self.deployment, message, self.replica_id)
        except Exception as exc:  # noqa: BLE001 - replacing it matters more than the mark
            logger.warning("could not mark %s.%s unhealthy: %s", self.app, self.deployment, exc)
        try:
            handed = self.hand_back()
            if handed:
                logger.warning("unhealthy replica %s handed back %d requests", self.replica_id, handed)
        except Exception as exc:  # noqa: BLE001 - the pool hands them back again when it sees the exit
            logger.warning("could not hand back the requests of %s: %s", self.replica_id, exc)
        self._exit(lifecycle.EXIT_UNHEALTHY)

    def stop(self) -> None:
        self.stopping.set()
