"""Ray Serve's load-shedding example (doc_code/load_shedding.py), import lines changed; plus deployments that
record how many requests a replica runs at once, for `tests/test_concurrency_limits.py`."""

# ruff: noqa: I001
# fmt: off
# __example_deployment_start__
import time
import celery_serve as serve
from starlette.requests import Request

@serve.deployment(
    # Each replica will be sent 2 requests at a time.
    max_ongoing_requests=2,
    # Each caller queues up to 2 requests at a time.
    # (beyond those that are sent to replicas).
    max_queued_requests=2,
)
class SlowDeployment:
    def __call__(self, request: Request) -> str:
        # Emulate a long-running request, such as ML inference.
        time.sleep(2)
        return "Hello!"
# __example_deployment_end__
# fmt: on

import asyncio  # noqa: E402
import threading  # noqa: E402


class _Peak:
    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.lock = threading.Lock()

    def enter(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def leave(self) -> None:
        with self.lock:
            self.now -= 1


@serve.deployment(max_ongoing_requests=3)
class SyncPeak:
    def __init__(self) -> None:
        self.peak = _Peak()

    def work(self, seconds: float) -> int:
        self.peak.enter()
        time.sleep(seconds)
        self.peak.leave()
        return 1

    def most(self) -> int:
        return self.peak.most


@serve.deployment(max_ongoing_requests=3)
class AsyncPeak:
    def __init__(self) -> None:
        self.peak = _Peak()

    async def work(self, seconds: float) -> int:
        self.peak.enter()
        await asyncio.sleep(seconds)
        self.peak.leave()
        return 1

    async def most(self) -> int:
        return self.peak.most


shedding_app = SlowDeployment.bind()
sync_peak_app = SyncPeak.bind()
async_peak_app = AsyncPeak.bind()


@serve.deployment
class Speeds:
    """A sync method far under a millisecond and one well over it, for the inline rule."""

    def quick(self) -> int:
        return 1

    def slow(self) -> int:
        time.sleep(0.003)
        return 2


speeds_app = Speeds.bind()
