"""examples/pipeline.py with the real model: normalize >> Embed (CPU fallback here) >> Classify, and the
fan-out variant, each under the real `celery-serve run`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from examples._model import missing_dependencies
from tests.test_model_examples import STARTUP_TIMEOUT_S, Cli, start_cli, wait_until

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(missing_dependencies() is not None, reason=str(missing_dependencies())),
]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, httpx.Client]]:
    logs: Path = tmp_path_factory.mktemp("pipeline-example")
    started: dict[str, Cli] = {}
    try:
        for name in ("app", "fanout"):
            started[name] = start_cli(f"examples.pipeline:{name}", logs / f"{name}.log")
        for name, cli in started.items():
            wait_until(cli.ready, timeout_s=STARTUP_TIMEOUT_S, what=f"examples.pipeline:{name}")
        clients = {name: httpx.Client(base_url=cli.url, timeout=60) for name, cli in started.items()}
        yield clients
        for client in clients.values():
            client.close()
    finally:
        for cli in started.values():
            cli.stop()


def test_chain_labels_clear_sentences(pipelines: dict[str, httpx.Client]) -> None:
    http = pipelines["app"]
    good = http.get("/", params={"text": "What a WONDERFUL day, I love it!!"}).json()
    bad = http.post("/", json="The food was cold and the waiter was rude. https://example.com").json()
    assert good["label"] == "positive" and good["text"] == "what a wonderful day, i love it!"
    assert bad["label"] == "negative" and "https" not in bad["text"]


def test_chain_refuses_too_short_text_naming_the_step(pipelines: dict[str, httpx.Client]) -> None:
    response = pipelines["app"].get("/", params={"text": "a"})
    assert response.status_code == 400
    assert response.json()["deployment"] == "normalize"
    assert "at least 2 characters" in response.json()["message"]


def test_embed_runs_on_the_cpu_fallback_with_its_own_queue(pipelines: dict[str, httpx.Client]) -> None:
    routes = pipelines["app"].get("/-/routes").json()
    assert routes == {"/": "normalize >> Embed >> Classify"}


def test_fan_out_combines_both_branches(pipelines: dict[str, httpx.Client]) -> None:
    report = pipelines["fanout"].post("/", json="The service was slow and the food was cold!!").json()
    assert report["sentiment"]["label"] == "negative"
    assert report["stats"] == {"words": 9, "characters": 43, "exclamations": 1}
