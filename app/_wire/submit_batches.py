"""Submits that arrive together reach Redis in one ENQUEUE call.

Each request used to cost Redis one script call of its own, and a script call has a fixed cost (about 25 us
on Redis 7.0 here, several times a plain LPUSH) on top of its commands. A gateway under load has many submits
in flight: while one ENQUEUE call is on its way, the submits that come meanwhile wait and then go together in
the next call (as Nagle does for TCP segments, and the replica does for its answers). A submit alone goes out
at once, so a request at low load waits for nothing. Each caller gets its own request's outcome; a call that
fails fails every submit in it alike, as each would have failed alone (Redis unavailable: 503).
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.commands.core import AsyncScript

MAX_BATCH = 64  # submits per ENQUEUE call at most (keeps one call's run time in Redis short)

Submit = tuple[list[str], list[Any]]  # (keys, args) of one request, in the layout ENQUEUE documents
Outcome = tuple[int, bytes]  # (queue length or a negative code, job id)


class EnqueueBatcher:
    """Sends submits to ENQUEUE one call at a time, each call carrying every submit that waited for it."""

    def __init__(self, script: AsyncScript) -> None:
        self._script = script
        self._waiting: list[tuple[Submit, asyncio.Future[Outcome]]] = []
        self._sending = False
        self._task: asyncio.Future[None] | None = None

    async def enqueue(self, keys: list[str], args: list[Any]) -> Outcome:
        if self._sending:  # a call is on its way: go with the next one
            fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
            self._waiting.append(((keys, args), fut))
            return await fut
        self._sending = True
        try:
            return (await self._send([(keys, args)]))[0]
        finally:
            if self._waiting:
                self._task = asyncio.ensure_future(self._send_waiting())
            else:
                self._sending = False

    async def _send_waiting(self) -> None:
        """Send what waited, call after call, until nothing waits; then the next submit goes out by itself."""
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
                live = [(submit, fut) for submit, fut in batch if not fut.cancelled()]
                if not live:
                    continue
                try:
                    outcomes = await self._send([submit for submit, _ in live])
                except BaseException as exc:
                    for _, fut in live:
                        if not fut.done():
                            fut.set_exception(exc if isinstance(exc, Exception) else ConnectionError(repr(exc)))
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for (_, fut), outcome in zip(live, outcomes, strict=True):
                    if not fut.done():
                        fut.set_result(outcome)
        finally:
            self._sending = False
            for _, fut in self._waiting:  # only when this task was stopped: nobody will send them
                if not fut.done():
                    fut.set_exception(ConnectionError("the gateway is closing"))
            self._waiting = []

    async def _send(self, submits: list[Submit]) -> list[Outcome]:
        keys: list[str] = []
        args: list[Any] = [len(submits)]
        for submit_keys, submit_args in submits:
            keys += submit_keys
            args += [len(submit_keys) - 2, *submit_args]
        found = await self._script(keys=keys, args=args)
        return [(int(depth), existing) for depth, existing in found]
