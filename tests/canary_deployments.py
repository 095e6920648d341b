"""Two versions of one application, for `tests/test_canary.py`: each answers with its version."""

from __future__ import annotations

from starlette.requests import Request

import celery_serve as serve


@serve.deployment(num_replicas=1)
class Versioned:
    def __init__(self, version: str) -> None:
        self.version = version

    async def __call__(self, request: Request) -> dict:
        return {"version": self.version}


v1 = Versioned.bind("v1")
v2 = Versioned.bind("v2")
