"""Marking the jobs a replica started from its blocking pop `running`, off the event loop, several per call.

A job reads `queued` until something marks it `running`; DRAIN marks what it takes in the same script, but a
message from the blocking pop (the idle path, where latency matters) starts before any bookkeeping. Its mark
goes out from a side thread: sync user code may hold the replica's event loop for as long as it runs, and its
job must read `running` meanwhile (at once: code that has visibly started must not read `queued`). Marks that
pile up go out together in one call; a request answered before its mark went out needs none (its answer records
its final state, and when it started), nor does one whose stream's head went out first (the head marks it).
"""

from __future__ import annotations

import logging
import threading
import time

from celery_serve._wire import keys as _keys
from celery_serve._wire import scripts as _scripts
from celery_serve._wire.connections import REDIS_FAULTS, is_cluster, sync_client
from celery_serve._wire.slots import key_slot

logger = logging.getLogger(__name__)


class RunningMarks:
    """Jobs waiting to be marked running, and the thread that marks them."""

    def __init__(self, url: str) -> None:
        self._mark = sync_client(url).register_script(_scripts.MARK_RUNNING)
        self._cluster = is_cluster(url)  # one call per hash slot (a pipeline's later steps mark another's jobs)
        self._pending: dict[str, float] = {}  # job id -> when its request started (epoch s)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="mark-running", daemon=True)
        self._thread.start()

    def started(self, job_id: str) -> None:
        """A request of `job_id` started now: mark its job running."""
        with self._lock:
            self._pending[job_id] = time.time()
        self._wake.set()

    def answered(self, job_id: str) -> float | str:
        """Its answer (or its stream's head) records the job's state: a mark not sent yet is dropped, and when
        the request started is returned for that call to record; '' when the mark went out (it recorded that)."""
        with self._lock:
            return self._pending.pop(job_id, "")

    def restore(self, job_id: str, at: float | str) -> None:
        """A call that took `answered`'s start time failed to record it (a stream head that failed or could not
        open): the job's mark, with the time it really started, goes out after all, unless one is pending."""
        if at == "":
            return
        with self._lock:
            self._pending.setdefault(job_id, float(at))
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                ready, self._pending = list(self._pending.items()), {}
            if ready:
                self._send(ready)

    def _send(self, ready: list[tuple[str, float]]) -> None:
        groups: dict[int, list[tuple[str, float]]] = {}
        for job_id, at in ready:
            groups.setdefault(key_slot(_keys.job(job_id)) if self._cluster else 0, []).append((job_id, at))
        for group in groups.values():
            try:
                self._mark(keys=[_keys.job(job_id) for job_id, _ in group], args=[at for _, at in group])
            except REDIS_FAULTS as exc:  # the job reads queued a while longer; its answer still ends it
                logger.debug("could not mark %d jobs running: %s", len(group), exc)
