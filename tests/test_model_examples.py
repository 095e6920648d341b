"""The model examples with the real MiniLM model, end to end: `celery-serve run`, HTTP, real replicas.

Each example runs as the README runs it (`celery-serve run examples.sentiment:app`), in its own process
with its own embedded Redis and gateway on a free port, so these tests share nothing with the session's
other applications. Skipped, with the reason, where sentence-transformers or the model package is missing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient

from celery_serve._runtime.launcher import free_port
from examples._model import EMBEDDING_DIM, missing_dependencies

_MISSING = missing_dependencies()
pytestmark = [pytest.mark.model, pytest.mark.skipif(_MISSING is not None, reason=_MISSING or "")]

REPO = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 240.0
READY_LINE = "Press Ctrl-C to stop."

POSITIVE = [
    "I absolutely love this, it is the best thing ever!",
    "The waiter was charming and the pasta was superb.",
    "Congratulations, you did an amazing job!",
    "What a beautiful sunny morning.",
]
NEGATIVE = [
    "I absolutely hate this, it is the worst thing ever!",
    "The waiter was rude and the pasta was inedible.",
    "This is terrible news.",
    "The app is confusing and I regret installing it.",
]


@dataclass
class Cli:
    """One `celery-serve run` process and where it answers."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"celery-serve exited with code {self.proc.returncode}:\n{self.output()}")
        return READY_LINE in self.output()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the CLI stops its workers, gateway and Redis
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.1)


def _celery_serve() -> list[str]:
    script = Path(sys.executable).with_name("celery-serve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "celery_serve"]


def start_cli(target: str, log: Path) -> Cli:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SERVE_LOG_LEVEL": "WARNING"}
    env.pop("REDIS_URL", None)  # embed a Redis of its own
    with open(log, "wb") as fh:
        command = [*_celery_serve(), "run", target, "--port", str(port), "--flower-port", str(free_port())]
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return Cli(proc, f"http://127.0.0.1:{port}", log)


@pytest.fixture(scope="module")
def clis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Cli]]:
    """Both examples, started together (loading the model is the slow part)."""
    logs = tmp_path_factory.mktemp("model-examples")
    started: dict[str, Cli] = {}
    try:
        for name in ("sentiment", "embeddings"):
            started[name] = start_cli(f"examples.{name}:app", logs / f"{name}.log")
        for name, cli in started.items():
            what = f"`celery-serve run examples.{name}:app`"
            wait_until(cli.ready, timeout_s=STARTUP_TIMEOUT_S, what=what)
        yield started
    finally:
        for cli in started.values():
            cli.stop()


@pytest.fixture(scope="module")
def sentiment(clis: dict[str, Cli]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=clis["sentiment"].url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def embeddings(clis: dict[str, Cli]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=clis["embeddings"].url, timeout=60) as client:
        yield client


# -- sentiment -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", POSITIVE)
def test_clearly_positive_sentences_are_positive(sentiment: httpx.Client, text: str) -> None:
    response = sentiment.post("/classify", params={"input_text": text})
    assert response.status_code == 200, response.text
    got = response.json()
    assert got["label"] == "positive" and got["text"] == text
    assert 0.5 < got["score"] <= 1.0


@pytest.mark.parametrize("text", NEGATIVE)
def test_clearly_negative_sentences_are_negative(sentiment: httpx.Client, text: str) -> None:
    got = sentiment.post("/classify", params={"input_text": text}).json()
    assert got["label"] == "negative" and 0.5 < got["score"] <= 1.0


def test_a_json_body_is_classified_like_the_query(sentiment: httpx.Client) -> None:
    by_query = sentiment.post("/classify", params={"input_text": POSITIVE[0]}).json()
    by_body = sentiment.post("/classify", json={"text": POSITIVE[0]}).json()
    assert by_body == by_query


def _seed_classifier_errors() -> dict[str, Any]:
    """What a plain FastAPI app with the seed's route signature answers, for comparison."""
    seed = FastAPI()

    @seed.post("/classify")
    async def predict_sentiment(input_text: str = Query(..., min_length=2)) -> dict[str, str]:
        return {"text": input_text}

    with TestClient(seed) as client:
        return {
            "short": client.post("/classify", params={"input_text": "i"}),
            "missing": client.post("/classify"),
        }


def test_one_character_and_missing_input_are_422_exactly_as_fastapi(sentiment: httpx.Client) -> None:
    seed = _seed_classifier_errors()
    short = sentiment.post("/classify", params={"input_text": "i"})
    assert short.status_code == 422
    assert short.json() == seed["short"].json()
    missing = sentiment.post("/classify")
    assert missing.status_code == 422
    assert missing.json() == seed["missing"].json()
    assert sentiment.post("/classify", json={"text": "i"}).status_code == 422


def test_healthcheck_and_test_routes(sentiment: httpx.Client) -> None:
    health = sentiment.get("/healthcheck")
    assert health.status_code == 200, health.text
    info = sentiment.get("/test")
    assert info.status_code == 200 and "positive" in info.json()


# -- embeddings ----------------------------------------------------------------------------------------


def _embed(client: httpx.Client, body: object) -> httpx.Response:
    response = client.post("/", json=body)
    assert response.status_code == 200, response.text
    return response


def test_a_text_gets_384_floats_of_unit_length(embeddings: httpx.Client) -> None:
    vector = _embed(embeddings, "The weather is lovely today").json()["embedding"]
    assert len(vector) == EMBEDDING_DIM and all(isinstance(x, float) for x in vector)
    assert np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-4)
    same = _embed(embeddings, {"text": "The weather is lovely today"}).json()["embedding"]
    np.testing.assert_allclose(same, vector, atol=1e-5)


@pytest.mark.parametrize("form", ["texts", "list"])
def test_a_list_gets_a_list_of_embeddings(embeddings: httpx.Client, form: str) -> None:
    texts = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply."]
    body = {"texts": texts} if form == "texts" else texts
    vectors = np.array(_embed(embeddings, body).json()["embeddings"])
    assert vectors.shape == (3, EMBEDDING_DIM)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2] + 0.2  # the model really reads the text
    assert _embed(embeddings, []).json() == {"embeddings": []}


@pytest.mark.parametrize("body", [{"x": 1}, [1, 2], {"text": 3}, {"text": "a", "texts": ["b"]}])
def test_an_unreadable_body_is_400_and_says_what_to_send(embeddings: httpx.Client, body: object) -> None:
    response = embeddings.post("/", json=body)
    assert response.status_code == 400
    assert "text" in response.json()["message"]


def test_concurrent_callers_each_get_their_own_embedding(embeddings: httpx.Client) -> None:
    """Many requests at once are batched by the replica; each must still get the vector of its own text."""
    topics = ["cats", "taxes", "rain", "jazz"] * 12
    texts = [f"Request number {i} asks about {topic}." for i, topic in enumerate(topics)]
    expected = np.array(_embed(embeddings, {"texts": texts}).json()["embeddings"])
    with ThreadPoolExecutor(len(texts)) as pool:
        got = list(pool.map(lambda t: _embed(embeddings, t).json()["embedding"], texts))
    np.testing.assert_allclose(np.array(got), expected, atol=1e-4)


def test_the_readme_jobs_example_works_on_the_served_example(sentiment: httpx.Client) -> None:
    """The README's `curl -X POST localhost:8000/jobs/...` line, sent to the example `make run` serves."""
    import re

    readme = (REPO / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("curl -X POST localhost:8000/jobs/"))
    match = re.match(r"curl -X POST localhost:8000(?P<path>/jobs/\S+) -d '(?P<body>[^']*)'", line)
    assert match, line
    submitted = sentiment.post(match["path"], content=match["body"])
    assert submitted.status_code == 202, submitted.text
    job = sentiment.get(f"/jobs/{submitted.json()['job_id']}", params={"wait": 60}).json()
    assert job["status"] == "succeeded", job
    assert len(job["result"]) == 384
