"""Graceful shutdown of a replica, with Ray Serve's two options.

A replica told to stop (SIGTERM from its pool: scale-down, rollout, delete, shutdown) takes no new work,
then checks every `graceful_shutdown_wait_loop_s` whether what it runs has finished, for at most
`graceful_shutdown_timeout_s`. Requests still running then are cancelled; being unacknowledged, they are
handed back to the queue when the replica unregisters, and another replica runs them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

logger = logging.getLogger(__name__)


async def drain(
    ongoing: set[asyncio.Task[None]],
    config: Mapping[str, Any],
    replica_id: str,
    before_cancel: Callable[[], None] | None = None,
) -> int:
    """Wait for `ongoing` within the graceful-shutdown budget; cancel what is left. Returns how many were cancelled."""
    loop_s = float(config.get("graceful_shutdown_wait_loop_s") or 2.0)
    timeout = config.get("graceful_shutdown_timeout_s")
    timeout_s = 20.0 if timeout is None else float(timeout)
    deadline = time.monotonic() + timeout_s
    while ongoing:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        await asyncio.wait(set(ongoing), timeout=min(loop_s, left))
    pending = [task for task in ongoing if not task.done()]
    if not pending:
        return 0
    logger.warning(
        "replica %s: %d requests still running after graceful_shutdown_timeout_s=%g; handing them back",
        replica_id,
        len(pending),
        timeout_s,
    )
    if before_cancel is not None:
        before_cancel()
    for task in pending:
        task.cancel()
    await asyncio.wait(pending, timeout=1.0)
    return len(pending)
