"""Model multiplexing as in Ray: `@multiplexed` per-replica LRU of models, `get_multiplexed_model_id()`, the
`serve_multiplexed_model_id` header and `handle.options(multiplexed_model_id=...)`, and model affinity:
requests for a model go to the replica that holds it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

import celery_serve as serve
from celery_serve.multiplex import ModelCache, get_multiplexed_model_id, set_multiplexed_model_id
from tests.conftest import Served
from tests.served_apps import served_apps

# --- the per-replica model cache, in process ------------------------------------------------------------


class Loader:
    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.unloaded: list[str] = []

    @serve.multiplexed(max_num_models_per_replica=2)
    async def get_model(self, model_id: str) -> Any:
        await asyncio.sleep(0.01)
        self.loaded.append(model_id)
        owner = self

        class Model:
            def __del__(self) -> None:
                if model_id not in owner.unloaded:
                    owner.unloaded.append(model_id)

        return Model()


def test_least_recently_used_model_is_unloaded_to_make_room() -> None:
    loader = Loader()

    async def main() -> None:
        a = await loader.get_model("a")
        await loader.get_model("b")
        assert await loader.get_model("a") is a  # a is used again: b is now the least recently used
        await loader.get_model("c")

    asyncio.run(main())
    assert loader.loaded == ["a", "b", "c"]
    assert loader.unloaded[:1] == ["b"]  # its __del__ was called on eviction


def test_concurrent_requests_for_one_model_load_it_once() -> None:
    loader = Loader()

    async def main() -> list[Any]:
        return await asyncio.gather(*(loader.get_model("a") for _ in range(5)))

    models = asyncio.run(main())
    assert loader.loaded == ["a"] and all(m is models[0] for m in models)


def test_loader_must_be_async_and_options_valid() -> None:
    with pytest.raises(serve.DeploymentConfigError, match="async loader"):

        @serve.multiplexed
        def get_model(model_id: str) -> str:
            return model_id

    with pytest.raises(serve.DeploymentConfigError, match="max_num_models_per_replica must be an integer"):
        serve.multiplexed(max_num_models_per_replica=0)
    with pytest.raises(serve.DeploymentConfigError, match="one model id"):
        asyncio.run(Loader().get_model(""))


def test_model_id_is_per_request_context() -> None:
    async def request(model_id: str) -> str:
        set_multiplexed_model_id(model_id)
        await asyncio.sleep(0.01)
        return get_multiplexed_model_id()

    async def main() -> list[str]:
        return await asyncio.gather(*(asyncio.create_task(request(m)) for m in ["x", "y", "z"]))

    assert asyncio.run(main()) == ["x", "y", "z"]
    assert get_multiplexed_model_id() == ""


def test_model_cache_capacity_counts_loads_in_flight() -> None:
    cache = ModelCache(1)

    async def main() -> None:
        async def load(name: str) -> str:
            await asyncio.sleep(0.01)
            return name

        await asyncio.gather(cache.get("a", lambda: load("a")), cache.get("a", lambda: load("a")))
        await cache.get("b", lambda: load("b"))

    asyncio.run(main())
    assert cache.held() == ["b"] and (cache.loads, cache.unloads) == (2, 1)


# --- Ray's guide on real Redis, workers and HTTP -----------------------------------------------------------


@pytest.fixture(scope="module")
def mx(served: Served) -> Iterator[dict[str, Any]]:
    from tests import ray_multiplex_examples as ex

    apps = {
        "mx-infer": ex.inferencer_app,
        "mx-compose": ex.composition_app,
        "mx-batched": ex.batched_app,
        "mx-affinity": ex.affinity_app,
        "mx-single": ex.single_app,
    }
    with served_apps(served, {name: (app, f"/{name}") for name, app in apps.items()}) as handles:
        yield handles


def test_guide_header_and_handle_option_pick_the_model(mx: dict[str, Any], served: Served) -> None:
    import torch

    def expected(model_id: int) -> float:
        torch.manual_seed(model_id)
        return torch.nn.Linear(4, 1).forward(torch.ones(1, 4)).item()

    with served.http() as client:
        resp = client.get("/mx-infer", headers={"serve_multiplexed_model_id": "1"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == pytest.approx(expected(1))
    obj_ref = mx["mx-infer"].options(multiplexed_model_id="2").remote("<your param>")
    assert obj_ref.result(timeout_s=60) == pytest.approx(expected(2))


def test_guide_model_composition(mx: dict[str, Any], served: Served) -> None:
    with served.http() as client:
        resp = client.get("/mx-compose")
    assert resp.status_code == 200, resp.text
    assert resp.text == "bar"  # a str return value is sent as text, as in Ray


def test_guide_batched_multiplexing_batches_per_model(mx: dict[str, Any], served: Served) -> None:
    async def main() -> list[tuple[str, str]]:
        import httpx

        async with httpx.AsyncClient(base_url=served.gateway_url, timeout=60) as client:

            async def one(model: str, text: str) -> tuple[str, str]:
                resp = await client.post("/mx-batched", content=text, headers={"serve_multiplexed_model_id": model})
                assert resp.status_code == 200, resp.text
                return text, resp.text

            calls = [one(m, f"{m}-in{i}") for i in range(4) for m in ("ma", "mb")]
            return await asyncio.gather(*calls)

    for text, answer in asyncio.run(main()):
        assert answer == f"{text.split('-')[0]}:{text}"  # each answer came from its own model's batch


def test_requests_for_a_model_stay_on_the_replica_that_holds_it(mx: dict[str, Any]) -> None:
    handle = mx["mx-affinity"]
    first = handle.options(multiplexed_model_id="warm").remote().result(timeout_s=60)
    answers = [handle.options(multiplexed_model_id="warm").remote(i).result(timeout_s=60) for i in range(15)]
    assert {a["replica"] for a in answers} == {first["replica"]}  # never loaded anywhere else
    assert answers[-1]["loads"] == first["loads"]  # and never loaded again


def test_lru_unloads_on_the_replica(mx: dict[str, Any]) -> None:
    """One replica with 2 slots asked for three models in turn: the least recently used one is unloaded
    (its __del__ called), and asking for it again loads it again."""
    handle = mx["mx-single"]
    for model in ("lru-1", "lru-2", "lru-1", "lru-3"):
        assert handle.options(multiplexed_model_id=model).remote().result(timeout_s=60)["model"] == model
    state = handle.state.remote().result(timeout_s=60)
    assert state["loads"] == ["lru-1", "lru-2", "lru-3"]
    assert "lru-2" in state["unloaded"] and "lru-1" not in state["unloaded"]
    handle.options(multiplexed_model_id="lru-2").remote().result(timeout_s=60)
    assert handle.state.remote().result(timeout_s=60)["loads"][-1] == "lru-2"
