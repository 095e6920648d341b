"""Celery task events from replicas, so Flower (and `celery events`) shows every request as a task.

Replicas do not run Celery's task machinery, so they send the events Celery's worker would:
`task-received`, `task-started`, `task-succeeded`, `task-failed`, `task-revoked` (expired), in Celery's
own format, as the worker that owns the replica (`<app>.<deployment>.<pid>@<host>`).

The request path only appends a tuple to a deque. A publisher thread turns the tuples into events once a
second and sends them with Celery's `EventDispatcher` in buffered batches (one message holds a list of
events, which Celery's `EventReceiver` and Flower read as `task.multi`). Over Redis, events travel by
PUBLISH on the `celeryev` fanout exchange. Like Celery's worker, replicas send task events only while a monitor
asks for them: Flower (and `celery control enable_events`) broadcasts `enable_events`, which the
deployment's worker turns into a short-lived Redis key (`celery_serve.workers.worker`); without it the thread drops
the tuples unbuilt, so an unwatched deployment pays nothing but the appends. `SERVE_TASK_EVENTS=1` sends
them always, `0` never.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
from typing import Any

from celery_serve._wire import keys as _keys
from celery_serve._wire.connections import sync_client
from celery_serve._wire.envelope import Envelope
from celery_serve.workers.batching import Outcome

logger = logging.getLogger(__name__)

FLUSH_EVERY_S = 1.0
_MAX_BUFFERED = 100_000  # events kept while Redis is unreachable; the oldest go first
_EVENTS_PER_MESSAGE = 500
_LISTENER_CHECK_S = 2.0
_REPR_MAX = 256
_RECEIVED, _FINISHED, _EXPIRED = 0, 1, 2


class TaskEvents:
    """Buffers a replica's task events; `start()` runs the thread that publishes them."""

    def __init__(
        self,
        url: str,
        hostname: str,
        *,
        enabled: bool = True,
        always: bool = False,
        flush_every_s: float = FLUSH_EVERY_S,
    ) -> None:
        self.url = url
        self.hostname = hostname
        self.enabled = enabled
        self.always = always  # send even when no monitor asked for events
        self.flush_every_s = flush_every_s
        self._buffer: collections.deque[tuple[int, Envelope, float, Outcome | None]] = collections.deque(
            maxlen=_MAX_BUFFERED
        )
        self._received_at: dict[str, float] = {}  # publisher thread only: task id -> received time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._dispatcher: Any = None
        self._connection: Any = None
        self._listening = False
        self._redis: Any = None
        self._checked_at = 0.0
        self.published = 0

    @classmethod
    def from_env(cls, url: str) -> TaskEvents:
        """As the pool configures a replica: `SERVE_WORKER_HOSTNAME`; `SERVE_TASK_EVENTS` is `auto` (when a
        monitor asks, the default), `1` (always) or `0` (never)."""
        hostname = os.environ.get("SERVE_WORKER_HOSTNAME") or f"replica.{os.getpid()}@{socket.gethostname()}"
        mode = os.environ.get("SERVE_TASK_EVENTS", "auto").lower()
        return cls(
            url, hostname, enabled=mode not in ("0", "false", "no", "off"), always=mode in ("1", "true", "yes", "on")
        )

    # --- the request path: appends only -----------------------------------------------------------------

    def received(self, env: Envelope) -> None:
        if self.enabled:
            self._buffer.append((_RECEIVED, env, time.time(), None))

    def finished(self, env: Envelope, outcome: Outcome) -> None:
        if self.enabled:
            self._buffer.append((_FINISHED, env, time.time(), outcome))

    def expired(self, env: Envelope) -> None:
        if self.enabled:
            self._buffer.append((_EXPIRED, env, time.time(), None))

    # --- the publisher thread -----------------------------------------------------------------------------

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="celery-serve-events", daemon=True)
            self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Publish what is buffered and stop the thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.flush_every_s):
            self.flush()
        self.flush()
        self._close()

    def flush(self) -> int:
        """Send everything buffered; returns how many events went out."""
        items = []
        while True:
            try:
                items.append(self._buffer.popleft())
            except IndexError:
                break
        if not items:
            return 0
        try:
            if not self._someone_listens():
                self._received_at.clear()
                return 0
            sent = self._send(items)
        except Exception as exc:  # noqa: BLE001 - events are best effort; serving goes on
            logger.warning("could not publish %d task events (%s); dropping them", len(items), exc)
            self._close()
            return 0
        self.published += sent
        return sent

    def _someone_listens(self) -> bool:
        """Has a monitor asked for task events lately? Checked every few seconds (Flower may start later)."""
        if self.always:
            return True
        now = time.monotonic()
        if now - self._checked_at >= _LISTENER_CHECK_S:
            if self._redis is None:
                self._redis = sync_client(self.url)
            self._listening = bool(self._redis.exists(_keys.TASK_EVENTS))
            self._checked_at = now
        return self._listening

    def _get_dispatcher(self) -> Any:
        if self._dispatcher is None:
            from celery_serve.workers.celery_app import make_celery

            celery = make_celery(self.url)
            self._connection = celery.connection_for_write()
            self._dispatcher = celery.events.Dispatcher(
                self._connection,
                hostname=self.hostname,
                buffer_group={"task"},  # events go out as lists, one message per flush
                buffer_limit=_EVENTS_PER_MESSAGE,
                buffer_while_offline=False,  # our own deque buffers; the dispatcher must not grow without bound
            )
        return self._dispatcher

    def _send(self, items: list[tuple[int, Envelope, float, Outcome | None]]) -> int:
        from celery.utils.time import utcoffset as celery_utcoffset

        dispatcher = self._get_dispatcher()
        offset = celery_utcoffset()

        def utcoffset() -> int:  # once per flush, not per event (Celery's reads the local time each call)
            return offset

        sent = 0
        for kind, env, at, outcome in items:
            if kind == _RECEIVED:
                self._received_at[env.task_id] = at
                dispatcher.send(
                    "task-received",
                    utcoffset=utcoffset,
                    uuid=env.task_id,
                    name=env.task_name,
                    args=_args_repr(env),
                    kwargs=short_repr(env.kwargs),
                    root_id=env.job_id or env.task_id,
                    parent_id=None,
                    retries=0,
                    eta=None,
                    expires=env.deadline,
                    timestamp=at,
                )
                dispatcher.send("task-started", utcoffset=utcoffset, uuid=env.task_id, timestamp=at)
                sent += 2
            elif kind == _FINISHED and outcome is not None:
                started = self._received_at.pop(env.task_id, None)
                runtime = at - started if started is not None else None
                if outcome.ok:
                    dispatcher.send(
                        "task-succeeded",
                        utcoffset=utcoffset,
                        uuid=env.task_id,
                        result=short_repr(outcome.value),
                        runtime=runtime,
                        timestamp=at,
                    )
                else:
                    exc = outcome.error
                    dispatcher.send(
                        "task-failed",
                        utcoffset=utcoffset,
                        uuid=env.task_id,
                        exception=short_repr(exc),
                        traceback="",
                        runtime=runtime,
                        timestamp=at,
                    )
                sent += 1
            elif kind == _EXPIRED:
                dispatcher.send(
                    "task-revoked",
                    utcoffset=utcoffset,
                    uuid=env.task_id,
                    name=env.task_name,
                    terminated=False,
                    signum=None,
                    expired=True,
                    timestamp=at,
                )
                sent += 1
        dispatcher.flush()
        if len(self._received_at) > _MAX_BUFFERED:  # finished events lost (e.g. a cancelled request): forget
            self._received_at.clear()
        return sent

    def _close(self) -> None:
        dispatcher, connection = self._dispatcher, self._connection
        self._dispatcher = self._connection = None
        self._checked_at = 0.0
        for closer in (getattr(dispatcher, "close", None), getattr(connection, "release", None)):
            if closer is not None:
                try:
                    closer()
                except Exception:  # noqa: BLE001, S110 - closing a broken connection
                    pass


def _args_repr(env: Envelope) -> str:
    """What Flower shows as the task's arguments: the call's args, or the HTTP method and path."""
    if env.http is not None:
        query = env.http.get("query_string")
        return f"{env.http.get('method', '')} {env.http.get('path', '')}{'?' + query if query else ''}"
    return short_repr(env.args)


_MAX_ITEMS = 16


def short_repr(value: Any) -> str:
    """`repr` cut to _REPR_MAX characters, without building the repr of a large value first (only its
    first items, and the head of a long string, are looked at). Several times faster than Celery's
    `saferepr` for the small values requests usually carry."""
    if isinstance(value, (str, bytes)) and len(value) > _REPR_MAX:
        value = value[:_REPR_MAX]
    elif isinstance(value, (list, tuple)) and len(value) > _MAX_ITEMS:
        value = [*value[:_MAX_ITEMS], ...]
    elif isinstance(value, dict) and len(value) > _MAX_ITEMS:
        value = dict(list(value.items())[:_MAX_ITEMS]) | {"...": ...}
    try:
        text = repr(value)
    except Exception as exc:  # noqa: BLE001 - a user object whose __repr__ fails
        text = f"<unrepresentable {type(value).__name__}: {exc}>"
    return text if len(text) <= _REPR_MAX else text[: _REPR_MAX - 3] + "..."
