"""Ray Serve's model multiplexing guide (doc_code/multiplexed.py), import lines changed; the S3 download in
`ModelInferencer.get_model` is replaced by a small torch model built from the id (no network here). Plus
deployments that report which replica answered and what it loaded, for `tests/test_multiplexing.py`."""

# ruff: noqa: I001, UP006, UP035
import asyncio
import os
from typing import List

import starlette
import starlette.requests
import torch
from starlette.requests import Request

import celery_serve as serve
from celery_serve.handle import DeploymentHandle


@serve.deployment
class ModelInferencer:
    def __init__(self):
        self.bucket_name = "my_bucket"

    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_model(self, model_id: str):
        # (Ray downloads f"{model_id}/model.pt" from S3 and torch.load()s it.)
        torch.manual_seed(int(model_id))
        return torch.nn.Linear(4, 1)

    async def __call__(self, request: starlette.requests.Request):
        model_id = serve.get_multiplexed_model_id()
        model = await self.get_model(model_id)
        return model.forward(torch.ones(1, 4)).item()


entry = ModelInferencer.bind()


# __serve_model_composition_example_begin__
@serve.deployment
class Downstream:
    def __call__(self):
        return serve.get_multiplexed_model_id()


@serve.deployment
class Upstream:
    def __init__(self, downstream: DeploymentHandle):
        self._h = downstream

    async def __call__(self, request: starlette.requests.Request):
        return await self._h.options(multiplexed_model_id="bar").remote()


# __serve_model_composition_example_end__


# __serve_multiplexed_batching_example_begin__
@serve.deployment(max_ongoing_requests=15)
class BatchedMultiplexModel:
    @serve.multiplexed(max_num_models_per_replica=3)
    async def get_model(self, model_id: str):
        # Load and return your model here
        return model_id

    @serve.batch(max_batch_size=10, batch_wait_timeout_s=0.1)
    async def batched_predict(self, inputs: List[str]) -> List[str]:
        # Get the model ID - this works correctly inside batched functions
        # because all requests in the batch target the same model
        model_id = serve.get_multiplexed_model_id()
        model = await self.get_model(model_id)

        # Process the batch with the loaded model
        return [f"{model}:{inp}" for inp in inputs]

    async def __call__(self, request: Request):
        # Extract input from the request body
        input_text = await request.body()
        return await self.batched_predict(input_text.decode())


# __serve_multiplexed_batching_example_end__


class FakeModel:
    """A model whose unloading is seen: the replica calls its __del__ when it evicts it (as Ray does)."""

    unloaded: set = set()

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id

    def __del__(self) -> None:
        FakeModel.unloaded.add(self.model_id)


@serve.deployment(num_replicas=3, max_ongoing_requests=4)
class Affinity:
    """3 replicas x 2 model slots: which replica answers, and what each one loaded and unloaded."""

    def __init__(self) -> None:
        self.loads: List[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str):
        await asyncio.sleep(0.02)  # loading takes a while
        self.loads.append(model_id)
        return FakeModel(model_id)

    async def __call__(self, value: int = 0) -> dict:
        model = await self.get_model(serve.get_multiplexed_model_id())
        return {"model": model.model_id, "replica": os.getpid(), "loads": len(self.loads)}

    async def state(self) -> dict:
        return {"replica": os.getpid(), "loads": list(self.loads), "unloaded": sorted(FakeModel.unloaded)}


inferencer_app = entry
composition_app = Upstream.bind(Downstream.bind())
batched_app = BatchedMultiplexModel.bind()
affinity_app = Affinity.bind()
single_app = Affinity.options(name="Single", num_replicas=1).bind()
