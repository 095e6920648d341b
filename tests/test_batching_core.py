"""The batching core's rules, as pure units: no Redis, no Celery, no processes."""

from __future__ import annotations

import asyncio

import pytest

from celery_serve import batch
from celery_serve.batch import BatchConfig, batch_config
from celery_serve.exceptions import DeploymentConfigError
from celery_serve.workers.batching import (
    ArrivalRate,
    BatchSizeMismatchError,
    Item,
    batch_arguments,
    distribute,
    drop_stale,
    form_batches,
    run_batch,
    run_batch_async,
    wait_budget,
)


def items(*values: object, deadline: float | None = None) -> list[Item[int]]:
    return [Item(i, (v,), {}, deadline) for i, v in enumerate(values)]


# --- the decorator ---------------------------------------------------------------------------------


def test_batch_bare_uses_defaults() -> None:
    @batch
    def f(xs: list[int]) -> list[int]:
        return xs

    assert batch_config(f) == BatchConfig()


def test_batch_with_options_on_a_method_is_seen_through_the_bound_method() -> None:
    class Model:
        @batch(max_batch_size=4, batch_wait_timeout_s=0)
        def __call__(self, xs: list[int]) -> list[int]:
            return xs

    assert batch_config(Model().__call__) == BatchConfig(4, 0.0)
    assert batch_config(Model.__init__) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
        ({"max_batch_size": 2.5}, "max_batch_size must be an integer >= 1, got 2.5"),
        ({"max_batch_size": True}, "max_batch_size must be an integer >= 1, got True"),
        ({"batch_wait_timeout_s": -1}, "batch_wait_timeout_s must be a number >= 0, got -1"),
        ({"batch_wait_timeout_s": "1"}, "batch_wait_timeout_s must be a number >= 0, got '1'"),
    ],
)
def test_batch_rejects_bad_options_naming_them(options: dict[str, object], message: str) -> None:
    with pytest.raises(DeploymentConfigError, match=message.replace(".", r"\.")):
        batch(**options)  # type: ignore[arg-type]


def test_batch_positional_non_callable_is_refused() -> None:
    with pytest.raises(DeploymentConfigError, match="takes options as keywords"):
        batch(8)  # type: ignore[call-overload]


# --- grouping and ordering ----------------------------------------------------------------------


def test_form_batches_keeps_arrival_order_and_caps_size() -> None:
    batches = form_batches(items(*range(10)), max_batch_size=4)
    assert [[i.args[0] for i in b] for b in batches] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_form_batches_separates_shapes() -> None:
    mixed = [Item(0, (1,)), Item(1, (1, 2)), Item(2, (3,)), Item(3, (), {"x": 1}), Item(4, (4,))]
    batches = form_batches(mixed, max_batch_size=10)
    assert [[i.key for i in b] for b in batches] == [[0, 2, 4], [1], [3]]


def test_batch_arguments_one_list_per_argument() -> None:
    group = [Item(0, (1, "a"), {"k": True}), Item(1, (2, "b"), {"k": False})]
    assert batch_arguments(group) == ([[1, 2], ["a", "b"]], {"k": [True, False]})


# --- deadlines and cancellation ---------------------------------------------------------------


def test_drop_stale_separates_expired_and_cancelled() -> None:
    live = Item(0, (1,), deadline=110.0)
    expired = Item(1, (2,), deadline=99.0)
    cancelled = Item(2, (3,), deadline=200.0, cancelled=True)
    no_deadline = Item(3, (4,))
    assert drop_stale([live, expired, cancelled, no_deadline], now=100.0) == (
        [live, no_deadline],
        [expired],
        [cancelled],
    )


def test_expired_items_never_reach_the_function() -> None:
    seen: list[int] = []

    def f(xs: list[int]) -> list[int]:
        seen.extend(xs)
        return xs

    live, _, _ = drop_stale(items(1, deadline=50.0) + [Item(9, (2,), deadline=150.0)], now=100.0)
    assert [o.value for o in run_batch(f, live)] == [2]
    assert seen == [2]


# --- failure rules ------------------------------------------------------------------------------


def test_results_go_back_in_order() -> None:
    outcomes = run_batch(lambda xs: [x * 10 for x in xs], items(1, 2, 3))
    assert [o.value for o in outcomes] == [10, 20, 30]
    assert all(o.ok for o in outcomes)


def test_raising_fails_every_item_with_that_error() -> None:
    error = KeyError("boom")

    def f(xs: list[int]) -> list[int]:
        raise error

    outcomes = run_batch(f, items(1, 2, 3))
    assert [o.error for o in outcomes] == [error, error, error]


@pytest.mark.parametrize(
    ("returned", "detail"), [([1], "it got 3 items and returned 1 results"), ([1, 2, 3, 4], "returned 4")]
)
def test_wrong_length_fails_every_item_naming_both_lengths(returned: list[int], detail: str) -> None:
    outcomes = run_batch(lambda xs: returned, items(1, 2, 3))
    assert all(isinstance(o.error, BatchSizeMismatchError) for o in outcomes)
    assert detail in str(outcomes[0].error)


def test_non_list_return_fails_every_item() -> None:
    outcomes = run_batch(lambda xs: "oops", items(1, 2))
    assert all(isinstance(o.error, BatchSizeMismatchError) for o in outcomes)
    assert "returned str" in str(outcomes[0].error)


def test_returned_exception_instance_fails_only_its_item() -> None:
    bad = ValueError("just this one")
    outcomes = run_batch(lambda xs: [1, bad, 3], items("a", "b", "c"))
    assert [o.value for o in outcomes] == [1, None, 3]
    assert [o.error for o in outcomes] == [None, bad, None]


def test_distribute_accepts_tuples() -> None:
    assert [o.value for o in distribute(items(1, 2), (5, 6))] == [5, 6]


def test_async_batch_function() -> None:
    async def f(xs: list[int]) -> list[int]:
        await asyncio.sleep(0)
        return [x + 1 for x in xs]

    outcomes = asyncio.run(run_batch_async(f, items(1, 2)))
    assert [o.value for o in outcomes] == [2, 3]


def test_async_batch_function_raising_fails_everyone() -> None:
    async def f(xs: list[int]) -> list[int]:
        raise RuntimeError("async boom")

    outcomes = asyncio.run(run_batch_async(f, items(1, 2)))
    assert all(str(o.error) == "async boom" for o in outcomes)


def test_sync_function_runs_inline_in_the_async_runner() -> None:
    outcomes = asyncio.run(run_batch_async(lambda xs: [len(xs)] * len(xs), items(1, 2, 3)))
    assert [o.value for o in outcomes] == [3, 3, 3]


# --- the wait window -------------------------------------------------------------------------------


def test_lone_request_at_low_load_runs_at_once() -> None:
    rate = ArrivalRate()
    for t in range(10):
        rate.observe(1, now=float(t) * 0.1)  # ten requests a second
    assert wait_budget(1, 32, 0.005, rate) == 0.0


def test_busy_queue_waits_for_company_up_to_the_window() -> None:
    rate = ArrivalRate()
    for t in range(500):
        rate.observe(5, now=t * 0.001)  # thousands a second, for half a second
    assert wait_budget(5, 32, 0.005, rate) == 0.005


def test_full_batch_never_waits() -> None:
    rate = ArrivalRate()
    for t in range(500):
        rate.observe(5, now=t * 0.001)
    assert wait_budget(32, 32, 0.005, rate) == 0.0


def test_zero_window_never_waits() -> None:
    rate = ArrivalRate()
    rate.rate = 1e9
    assert wait_budget(1, 32, 0.0, rate) == 0.0


def test_arrival_rate_decays_when_idle() -> None:
    rate = ArrivalRate(half_life_s=0.25)
    for t in range(500):
        rate.observe(5, now=t * 0.001)
    busy = rate.rate
    rate.observe(0, now=3.0)
    assert rate.rate < busy / 100
