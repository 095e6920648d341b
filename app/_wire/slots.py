"""Request ids that land in their deployment's Redis Cluster hash slot.

A request's keys share its result key's slot (`celery-task-meta-<id>`, kept as Celery names it); a
deployment's keys share its queue's slot (see `celery_serve._wire.keys`). On a cluster, a script may touch one
slot only, and the enqueue, take and answer scripts touch both kinds. So on a cluster a request's id is chosen to
put its result key in its deployment's slot: a random UUID whose last four hex digits are picked to make the
CRC16 that Redis Cluster hashes keys with come out right. CRC16 (XMODEM) is linear, so those digits are found
by one table lookup, not a search; the id stays a plain UUID string.
"""

from __future__ import annotations

import binascii
import uuid
from functools import lru_cache

from redis.crc import key_slot as _key_slot

from celery_serve._wire import keys as _keys

SLOTS = 16384
_SUFFIX = 4  # hex digits chosen at the end of the id
_ZEROS = b"\0" * _SUFFIX


def key_slot(key: str | bytes) -> int:
    """The Redis Cluster hash slot of a key (hash tags included)."""
    return int(_key_slot(key.encode() if isinstance(key, str) else key))


@lru_cache(maxsize=1)
def _suffixes() -> dict[int, bytes]:
    """Slot bits of CRC16(suffix) -> one four-hex-digit suffix with them (covers ~98% of the slots)."""
    table: dict[int, bytes] = {}
    for n in range(16**_SUFFIX):
        suffix = b"%04x" % n
        table.setdefault(binascii.crc_hqx(suffix, 0) & (SLOTS - 1), suffix)
    return table


def task_id_in_slot(slot: int) -> str:
    """A random UUID string whose result key (and so every key of its request) hashes to `slot`."""
    table = _suffixes()
    while True:
        head = str(uuid.uuid4())[:-_SUFFIX]
        state = binascii.crc_hqx((_keys.RESULT_PREFIX + head).encode(), 0)
        # CRC16(head + suffix) = CRC16(head + zeros) ^ CRC16(suffix): the suffix must supply the difference
        wanted = (slot ^ binascii.crc_hqx(_ZEROS, state)) & (SLOTS - 1)
        suffix = table.get(wanted)
        if suffix is not None:
            return head + suffix.decode()


def task_id_for(app: str, deployment: str) -> str:
    """A new request id in the hash slot of a deployment's keys."""
    return task_id_in_slot(key_slot(_keys.deployment_slot_key(app, deployment)))
