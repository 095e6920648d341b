"""Model affinity on the wire: a request for a multiplexed model waits on its model's own queue.

A request that names a model (`serve_multiplexed_model_id`) goes to `<deployment queue>:mx:<model id>`
instead of the deployment's shared queue, and the model id joins the deployment's index of model queues.
Replicas that hold the model take from its queue first; any replica takes from it once its oldest request
has waited `SERVE_MULTIPLEX_FALLBACK_S` (see `celery_serve.workers.affinity`), so nothing waits on a model no
replica holds. Each such request is announced on the deployment's wake channel, so blocked replicas learn of
it without polling. Requests that name no model use the shared queue as before.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery_serve.exceptions import BadRequestError

MODEL_ID_HEADER = "serve_multiplexed_model_id"
MAX_MODEL_ID_CHARS = 256
_INDEX_REFRESH_S = 10.0


def _in_slot(queue: str) -> str:
    """The queue's name as a hash tag, so keys named after it share its Redis Cluster slot (a GPU queue's name
    already carries its deployment's tag)."""
    return queue if "{" in queue else "{" + queue + "}"


def model_queue(queue: str, model_id: str) -> str:
    return f"{_in_slot(queue)}:mx:{model_id}"


def model_index(queue: str) -> str:
    """The set of model ids that have (or had) a queue for this deployment queue."""
    return f"{_in_slot(queue)}:mx-models"


def wake_channel(queue: str) -> str:
    """Where a request put on one of this deployment's model queues is announced (the model id)."""
    return f"{queue}:mx-wake"


def check_model_id(model_id: Any) -> str:
    if not isinstance(model_id, str) or len(model_id) > MAX_MODEL_ID_CHARS or any(c in model_id for c in "\r\n"):
        raise BadRequestError(
            f"multiplexed model id must be a string of at most {MAX_MODEL_ID_CHARS} characters without line breaks, "
            f"got {str(model_id)[:80]!r}"
        )
    return model_id


def model_id_from_http(http: dict[str, Any] | None) -> str:
    """The `serve_multiplexed_model_id` header of an HTTP request ('' when absent)."""
    for name, value in (http or {}).get("headers") or ():
        if name.lower() == MODEL_ID_HEADER:
            return str(value).strip()
    return ""


class AffinityRouter:
    """The enqueue side: which queue a request goes to."""

    def __init__(self, redis: Any) -> None:
        self.redis = redis
        self._indexed: dict[tuple[str, str], float] = {}
        # SERVE_MULTIPLEX_AFFINITY=0: every request on the shared queue (routing without model awareness)
        self.enabled = os.environ.get("SERVE_MULTIPLEX_AFFINITY", "1") != "0"

    async def queue_for(self, target: Any, model_id: str) -> str:
        """The queue for a request to `target` (a DeploymentSpec): its model's when it names one and the
        deployment is multiplexed, the shared one otherwise (the model id still travels with the request)."""
        queue: str = target.queue
        if not model_id:
            return queue
        check_model_id(model_id)
        if not target.multiplexed or not self.enabled:
            return queue
        key = (queue, model_id)
        now = time.monotonic()
        if now - self._indexed.get(key, float("-inf")) > _INDEX_REFRESH_S:
            await self.redis.sadd(model_index(queue), model_id)
            self._indexed[key] = now
        return model_queue(queue, model_id)

    async def announce(self, queue: str, model_id: str) -> None:
        """Wake the replicas after the request is on its model's queue (see `celery_serve.workers.affinity`)."""
        await self.redis.publish(wake_channel(queue), model_id)
