"""`@batch` as in Ray: batched across concurrent in-replica calls, any sequence of the batch's length,
`max_concurrent_batches`, `batch_size_fn` and the setters; then Ray's batching guide on real workers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from celery_serve import batch
from celery_serve.exceptions import DeploymentConfigError
from celery_serve.workers.batching import BatchSizeMismatchError, Item
from tests.conftest import Served
from tests.served_apps import served_apps

# --- in-process: the batched method called from another method of the same instance -----------------


class Tokens:
    def __init__(self) -> None:
        self.batches: list[list[Any]] = []

    @batch(max_batch_size=4, batch_wait_timeout_s=0.2)
    async def process(self, sequences: list[str]) -> list[int]:
        self.batches.append(list(sequences))
        return [len(s.split()) for s in sequences]

    async def __call__(self, sequence: str) -> int:
        return await self.process(sequence)


async def _gather(obj: Any, values: list[Any]) -> list[Any]:
    return await asyncio.gather(*(obj(v) for v in values), return_exceptions=True)


def test_in_replica_call_batches_across_concurrent_calls_never_characters() -> None:
    obj = Tokens()
    values = ["a b", "c d e", "f", "g h i j", "k l"]
    assert asyncio.run(_gather(obj, values)) == [2, 3, 1, 4, 2]
    assert obj.batches == [values[:4], values[4:]]  # whole strings, in arrival order, at most 4 at once


def test_lone_call_runs_after_the_wait_with_a_batch_of_one() -> None:
    obj = Tokens()
    assert asyncio.run(obj("one two")) == 2
    assert obj.batches == [["one two"]]


def test_keyword_and_function_forms() -> None:
    calls: list[list[int]] = []

    @batch(max_batch_size=3, batch_wait_timeout_s=0.05)
    async def double(xs: list[int]) -> list[int]:
        calls.append(list(xs))
        return [x * 2 for x in xs]

    async def main() -> list[int]:
        return list(await asyncio.gather(double(1), double(2), double(xs=3)))

    assert asyncio.run(main()) == [2, 4, 6]
    assert calls == [[1, 2], [3]]  # a keyword call has another shape: its own batch


@pytest.mark.parametrize(
    "make",
    [
        lambda xs: np.array(xs) * 2,
        lambda xs: torch.tensor(xs) * 2,
        lambda xs: tuple(x * 2 for x in xs),
        lambda xs: [x * 2 for x in xs],
    ],
    ids=["numpy", "torch", "tuple", "list"],
)
def test_any_sequence_of_the_batch_length_is_split_along_its_first_axis(make: Any) -> None:
    class M:
        @batch(max_batch_size=8, batch_wait_timeout_s=0.05)
        async def __call__(self, xs: list[int]) -> Any:
            return make(xs)

    results = asyncio.run(_gather(M(), [1, 2, 3]))
    assert [int(r) for r in results] == [2, 4, 6]


class Wrong:
    @batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def shorten(self, xs: list[int]) -> list[int]:
        return xs[:-1]

    @batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def text(self, xs: list[str]) -> str:
        return "".join(xs)


def test_wrong_length_names_the_method_and_both_lengths() -> None:
    obj = Wrong()
    errors = asyncio.run(_gather(obj.shorten, [1, 2, 3]))
    assert all(isinstance(e, BatchSizeMismatchError) for e in errors)
    assert "'Wrong.shorten'" in str(errors[0]) and "got 3 items and returned 2 results" in str(errors[0])


def test_a_string_of_the_right_length_is_refused_not_split_into_characters() -> None:
    errors = asyncio.run(_gather(Wrong().text, ["a", "b"]))  # "ab" has length 2: still refused
    assert all(isinstance(e, BatchSizeMismatchError) for e in errors)
    assert "returned str" in str(errors[0])


def test_raising_fails_every_caller_of_the_batch_and_only_them() -> None:
    class Boom:
        @batch(max_batch_size=2, batch_wait_timeout_s=0.05)
        async def f(self, xs: list[int]) -> list[int]:
            if 0 in xs:
                raise ValueError("zero")
            return xs

    results = asyncio.run(_gather(Boom().f, [0, 1, 2, 3]))
    assert [type(r).__name__ for r in results] == ["ValueError", "ValueError", "int", "int"]


def test_max_concurrent_batches_lets_batches_overlap_up_to_the_limit() -> None:
    def make(limit: int) -> Any:
        class Slow:
            def __init__(self) -> None:
                self.now = 0
                self.most = 0

            @batch(max_batch_size=1, batch_wait_timeout_s=0, max_concurrent_batches=limit)
            async def f(self, xs: list[int]) -> list[int]:
                self.now += 1
                self.most = max(self.most, self.now)
                await asyncio.sleep(0.05)
                self.now -= 1
                return xs

        return Slow()

    for limit in (1, 3):
        obj = make(limit)
        assert asyncio.run(_gather(obj.f, list(range(6)))) == list(range(6))
        assert obj.most == limit


def test_batch_size_fn_caps_the_total_and_fails_an_item_too_big_alone() -> None:
    seen: list[list[str]] = []

    class Tok:
        @batch(max_batch_size=5, batch_wait_timeout_s=0.05, batch_size_fn=lambda s: sum(len(x.split()) for x in s))
        async def f(self, seqs: list[str]) -> list[int]:
            seen.append(list(seqs))
            return [len(s.split()) for s in seqs]

    results = asyncio.run(_gather(Tok().f, ["a b", "c d", "e f", "g h i j k l"]))
    assert results[:3] == [2, 2, 2]
    assert isinstance(results[3], BatchSizeMismatchError) and "size is 6" in str(results[3])
    assert seen == [["a b", "c d"], ["e f"]]


def test_setters_change_the_options_of_a_running_batcher() -> None:
    obj = Tokens()
    obj.process.set_max_batch_size(2)
    obj.process.set_batch_wait_timeout_s(0.01)
    assert (obj.process._get_max_batch_size(), obj.process._get_batch_wait_timeout_s()) == (2, 0.01)
    asyncio.run(_gather(obj, ["a", "b", "c"]))
    assert obj.batches == [["a", "b"], ["c"]]
    with pytest.raises(DeploymentConfigError, match="max_batch_size must be an integer >= 1, got 0"):
        obj.process.set_max_batch_size(0)
    Tokens.process.set_max_batch_size(4)  # options are per function, as in Ray: put it back for other tests
    Tokens.process.set_batch_wait_timeout_s(0.2)


def test_bad_options_are_refused_naming_them() -> None:
    with pytest.raises(DeploymentConfigError, match="max_concurrent_batches must be an integer >= 1, got 0"):
        batch(max_concurrent_batches=0)
    with pytest.raises(DeploymentConfigError, match="batch_size_fn must be a function"):
        batch(batch_size_fn=3)  # type: ignore[arg-type]


def test_the_consumer_path_runs_drained_requests_with_the_same_rules() -> None:
    """What the replica does with requests it took from Redis together: one call per batch, numpy split."""
    from celery_serve.batch import batcher_of

    class M:
        @batch(max_batch_size=2, batch_wait_timeout_s=0)
        async def __call__(self, xs: list[int]) -> Any:
            return np.array(xs) + 1

    obj = M()
    found = batcher_of(obj.__call__)
    assert found is not None
    outcomes = asyncio.run(found.run_items(obj, [Item(0, (1,)), Item(0, (2,)), Item(0, (3,))]))
    assert [int(o.value) for o in outcomes] == [2, 3, 4]


# --- Ray's batching guide on real Redis and workers ---------------------------------------------------


@pytest.fixture(scope="module")
def guide(served: Served) -> Iterator[dict[str, Any]]:
    """The guide's deployments, run into the session's serving processes (and removed after)."""
    from tests import ray_batching_examples as ex

    apps = {
        "guide-numpy": ex.model_app,
        "guide-reconfigure": ex.reconfigured_app,
        "guide-tokens": ex.token_app,
        "guide-recorder": ex.recorder_app,
    }
    with served_apps(served, {name: (app, f"/{name}") for name, app in apps.items()}) as handles:
        yield {"handles": handles}


def test_guide_numpy_model(guide: dict[str, Any]) -> None:
    handle = guide["handles"]["guide-numpy"]
    responses = [handle.remote(i) for i in range(8)]
    assert list(r.result() for r in responses) == [i * 2 for i in range(8)]


def test_guide_batch_params_update(guide: dict[str, Any]) -> None:
    handle = guide["handles"]["guide-reconfigure"]
    assert handle.batch_options.remote().result() == [10, 0.5]
    responses = [handle.remote(i) for i in range(12)]
    assert [r.result() for r in responses] == [i * 2 for i in range(12)]


def test_guide_token_batcher(guide: dict[str, Any]) -> None:
    handle = guide["handles"]["guide-tokens"]
    sequences = [
        "This is a short sentence",
        "This is a much longer sentence with many more words to process",
        "Short",
    ]
    results = [handle.remote(seq).result() for seq in sequences]
    assert results == [5, 12, 1]


def test_token_batcher_pattern_batches_whole_strings_across_concurrent_calls(guide: dict[str, Any]) -> None:
    handle = guide["handles"]["guide-recorder"]
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    responses = [handle.remote(w) for w in words]
    assert [r.result(timeout_s=30) for r in responses] == [len(w) for w in words]
    batches = handle.seen.remote().result()
    assert sorted(w for b in batches for w in b) == sorted(words)  # whole strings, never characters
    assert max(len(b) for b in batches) > 1  # concurrent calls met in one batch
    assert all(len(b) <= 4 for b in batches)


def test_wrong_length_reaches_the_caller_naming_method_and_lengths(guide: dict[str, Any]) -> None:
    from celery_serve.exceptions import ServeError

    handle = guide["handles"]["guide-recorder"]
    with pytest.raises(Exception) as raised:  # noqa: PT011 - the remote error's type is checked below
        handle.call_wrong_length.remote(3).result(timeout_s=30)
    text = str(raised.value)
    assert "BatchSizeMismatch" in type(raised.value).__name__ or isinstance(raised.value, ServeError)
    assert "BatchRecorder.wrong_length" in text and "got 1 items and returned 2 results" in text


def test_tensor_and_tuple_returns_over_the_wire(guide: dict[str, Any]) -> None:
    handle = guide["handles"]["guide-recorder"]
    tensors = [handle.tensor.remote(float(i)) for i in range(5)]
    assert [r.result(timeout_s=30) for r in tensors] == [i * 3.0 for i in range(5)]
    tuples = [handle.as_tuple.remote(i) for i in range(5)]
    assert [r.result(timeout_s=30) for r in tuples] == [i + 1 for i in range(5)]
