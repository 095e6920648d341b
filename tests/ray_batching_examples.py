"""Ray Serve's batching guide (doc_code/batching_guide.py), with only the import line changed.

The deployments are at module level so that workers import them; the guide's `serve.run(...)` and
assertions are in `tests/test_batch_parity.py`.
"""

# ruff: noqa: I001, UP006, UP035  (Ray's code as written)
from typing import Dict, List

import numpy as np

import celery_serve as serve


# __batch_begin__
@serve.deployment
class Model:
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)
    async def __call__(self, multiple_samples: List[int]) -> List[int]:
        # Use numpy's vectorized computation to efficiently process a batch.
        return np.array(multiple_samples) * 2


# __batch_end__


# __batch_params_update_begin__
@serve.deployment(
    # These values can be overridden in the Serve config.
    user_config={
        "max_batch_size": 10,
        "batch_wait_timeout_s": 0.5,
    }
)
class ReconfiguredModel:
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.1)
    async def __call__(self, multiple_samples: List[int]) -> List[int]:
        # Use numpy's vectorized computation to efficiently process a batch.
        return np.array(multiple_samples) * 2

    def reconfigure(self, user_config: Dict):
        self.__call__.set_max_batch_size(user_config["max_batch_size"])
        self.__call__.set_batch_wait_timeout_s(user_config["batch_wait_timeout_s"])

    # not in the guide: lets the test see that reconfigure took effect
    def batch_options(self) -> list:
        return [self.__call__._get_max_batch_size(), self.__call__._get_batch_wait_timeout_s()]


# __batch_params_update_end__


class Graph:
    """Simple graph data structure for GNN workloads."""

    def __init__(self, num_nodes: int, node_features: list):
        self.num_nodes = num_nodes
        self.node_features = node_features


# __batch_size_fn_nlp_begin__
@serve.deployment
class TokenBatcher:
    @serve.batch(
        max_batch_size=512,  # Maximum total tokens per batch
        batch_wait_timeout_s=0.1,
        batch_size_fn=lambda sequences: sum(len(s.split()) for s in sequences),
    )
    async def process(self, sequences: List[str]) -> List[int]:
        """Process text sequences, batching by total token count."""
        # The batch_size_fn ensures total tokens don't exceed max_batch_size.
        # This is useful for transformer models with fixed context windows.
        return [len(seq.split()) for seq in sequences]

    async def __call__(self, sequence: str) -> int:
        return await self.process(sequence)


# __batch_size_fn_nlp_end__


@serve.deployment
class BatchRecorder:
    """Not from the guide: the TokenBatcher pattern, recording the batches its batched method saw."""

    def __init__(self) -> None:
        self.batches: list = []

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.5, max_concurrent_batches=1)
    async def process(self, sequences: List[str]) -> List[int]:
        self.batches.append(list(sequences))
        return [len(s) for s in sequences]

    async def __call__(self, sequence: str) -> int:
        return await self.process(sequence)

    def seen(self) -> list:
        return self.batches

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.5)
    async def wrong_length(self, values: List[int]) -> List[int]:
        return values[:-1] or [1, 2]

    async def call_wrong_length(self, value: int) -> int:
        return await self.wrong_length(value)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.2)
    def tensor(self, values: List[float]):
        import torch

        return torch.tensor(values) * 3

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.2)
    async def as_tuple(self, values: List[int]):
        return tuple(v + 1 for v in values)


model_app = Model.bind()
reconfigured_app = ReconfiguredModel.bind()
token_app = TokenBatcher.bind()
recorder_app = BatchRecorder.bind()
