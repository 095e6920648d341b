"""The deployment `benchmarks/multiplex_affinity.py` drives: 3 replicas x 2 model slots, models that take a
while to load, each answer saying which replica ran it and how many loads that replica has done."""

from __future__ import annotations

import asyncio
import os

import celery_serve as serve

LOAD_S = float(os.environ.get("BENCH_MODEL_LOAD_S", "0.05"))
INFER_S = float(os.environ.get("BENCH_INFER_S", "0.005"))


@serve.deployment(num_replicas=3, max_ongoing_requests=4)
class Multiplexed:
    def __init__(self) -> None:
        self.loads = 0

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> str:
        await asyncio.sleep(LOAD_S)
        self.loads += 1
        return model_id

    async def __call__(self) -> dict:
        model = await self.get_model(serve.get_multiplexed_model_id())
        await asyncio.sleep(INFER_S)
        return {"model": model, "replica": os.getpid(), "loads": self.loads}


app = Multiplexed.bind()
