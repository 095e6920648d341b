"""Marking the jobs a replica started from its blocking pop `running`, only for requests that last.

A job reads `queued` until something marks it `running`; DRAIN marks what it takes in the same script, but a
message from the blocking pop (the idle path, where latency matters) starts before any bookkeeping. Marking
each of those at once cost a Redis round trip per request, although most requests are answered within a few
milliseconds, and their answer records the job's final state anyway. So a mark waits `MARK_AFTER_S`: a
request answered sooner is never marked; one still running then is marked with the time it really started.
A request near its deadline is marked at once, so a reader never takes it for one that expired in the queue.

The marks go out from a side thread, several in one call: sync user code may hold the replica's event loop
for as long as it runs, and its job must read `running` meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time

from celery_serve._wire import keys as _keys
from celery_serve._wire import scripts as _scripts
from celery_serve._wire.connections import REDIS_FAULTS, sync_client

logger = logging.getLogger(__name__)

MARK_AFTER_S = 0.05  # a request still running this long after it started is marked running
NEAR_DEADLINE_S = 1.0  # closer than this to its deadline, a request is marked at once


class RunningMarks:
    """Jobs waiting to be marked running, and the thread that marks those still running when due."""

    def __init__(self, url: str) -> None:
        self._mark = sync_client(url).register_script(_scripts.MARK_RUNNING)
        self._due: dict[str, tuple[float, float]] = {}  # job id -> (due, monotonic; started at, epoch s)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mark-running", daemon=True)
        self._thread.start()

    def started(self, job_id: str, deadline: float | None) -> None:
        """A request of `job_id` started now: mark its job running unless it is answered within MARK_AFTER_S."""
        now = time.time()
        near = deadline is not None and deadline - now < NEAR_DEADLINE_S
        with self._lock:
            self._due[job_id] = (time.monotonic() + (0.0 if near else MARK_AFTER_S), now)
        self._wake.set()

    def answered(self, job_id: str) -> float | str:
        """Its answer records the job's final state: no mark is needed any more. Returns when the request
        started if it was never marked (the answer records it), else ''."""
        with self._lock:
            pending = self._due.pop(job_id, None)
        return pending[1] if pending is not None else ""

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._closed:
            with self._lock:
                first = min((due for due, _ in self._due.values()), default=None)
            if first is None:
                self._wake.wait()
            elif (wait := first - time.monotonic()) > 0:
                self._wake.wait(wait)
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                ready = [(job_id, at) for job_id, (due, at) in self._due.items() if due <= now]
                for job_id, _ in ready:
                    del self._due[job_id]
            if ready:
                self._send(ready)

    def _send(self, ready: list[tuple[str, float]]) -> None:
        try:
            self._mark(keys=[_keys.job(job_id) for job_id, _ in ready], args=[at for _, at in ready])
        except REDIS_FAULTS as exc:  # the job reads queued a while longer; its answer still ends it
            logger.debug("could not mark %d jobs running: %s", len(ready), exc)
