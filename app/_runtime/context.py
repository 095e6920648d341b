"""Where this process finds Redis, and the background event loop that handles use to talk to it.

Handles are called from synchronous code (scripts, sync replicas) and from other event loops (async
replicas, user apps), so their Redis traffic runs on one daemon thread's loop per process; callers get a
`concurrent.futures.Future` they can block on or await.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from celery_serve._wire.transport import QueueTransport
from celery_serve.exceptions import ServeError

T = TypeVar("T")
logger = logging.getLogger(__name__)

_lock = threading.Lock()
_redis_url: str | None = None
_io: _IOLoop | None = None


def set_redis_url(url: str | None) -> None:
    global _redis_url
    with _lock:
        _redis_url = url


def redis_url() -> str:
    url = _redis_url or os.environ.get("REDIS_URL")
    if not url:
        raise ServeError(
            "celery-serve is not running in this process: call serve.run(...) first, or set REDIS_URL to the "
            "Redis your deployments use"
        )
    return url


class BackgroundLoop:
    """An asyncio event loop on a daemon thread, for synchronous callers."""

    def __init__(self, name: str = "celery-serve-io") -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run_sync(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.run(coro).result()

    def stop(self) -> None:
        """Wind the loop down and close it: async generators still open are closed and tasks still pending are
        cancelled first, so that none is destroyed pending later ("Task was destroyed but it is pending!", as
        a client's stream left early used to print at exit) and no loop is left unclosed."""
        if self.thread.is_alive():
            try:
                self.run(_wind_down()).result(timeout=5)
            except Exception as exc:  # noqa: BLE001 - stopping anyway
                logger.debug("could not wind down %s: %r", self.thread.name, exc)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        if not self.thread.is_alive() and not self.loop.is_closed():
            self.loop.close()


async def _wind_down() -> None:
    await asyncio.get_running_loop().shutdown_asyncgens()
    rest = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in rest:
        task.cancel()
    if rest:
        await asyncio.wait(rest, timeout=2)


class _IOLoop(BackgroundLoop):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self.transport = QueueTransport(url)
        self.run_sync(self.transport.start())

    def close(self) -> None:
        try:
            self.run(self.transport.close()).result(timeout=5)
        except Exception:  # noqa: BLE001 - closing on the way out; nothing to report to
            pass
        self.stop()


def io_loop() -> _IOLoop:
    """The process's handle loop, (re)created for the current Redis URL."""
    global _io
    url = redis_url()
    with _lock:
        if _io is None or _io.url != url or not _io.thread.is_alive():
            old, _io = _io, _IOLoop(url)
        else:
            old = None
    if old is not None:
        old.close()
    return _io


def reset() -> None:
    """Stop the handle loop (after `shutdown()`), so a later `run()` starts fresh."""
    global _io
    with _lock:
        old, _io = _io, None
    if old is not None:
        old.close()
