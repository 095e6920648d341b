"""The seeds' FastAPI sentiment `Classifier`, made real: MiniLM embeddings and a nearest-centroid head.

    celery-serve run examples.sentiment:app
    curl -X POST 'http://127.0.0.1:8000/classify?input_text=I+love+this+place'
        ->  {"text": "I love this place", "label": "positive", "score": 0.97}
    curl -H 'Content-Type: application/json' -d '{"text": "The food was cold"}' http://127.0.0.1:8000/classify
        ->  {"text": "The food was cold", "label": "negative", "score": 0.9}
    curl -X POST 'http://127.0.0.1:8000/classify?input_text=i'    ->  422, as FastAPI answers
    curl http://127.0.0.1:8000/healthcheck                        ->  200 once the model answers

Two deployments: `SentimentClassifier`, the FastAPI ingress (light: no model in it), and `Embedder` from
`examples.embeddings`, which holds the model and batches: every /classify request is one `embed` call
through a handle, and the Embedder replica runs up to 32 of them as one model call.

How it labels: `sentiment_examples.json` holds a few dozen clearly positive and negative sentences on the
same topics. At start-up the classifier embeds them (one handle call) and keeps each label's mean
direction (centroid). A text gets the label whose centroid is nearest by cosine similarity; its score is
the softmax of the two similarities at temperature 0.05, the probability of the label it gets.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from celery_serve import DeploymentHandle, deployment, ingress
from examples.embeddings import Embedder

EXAMPLES_PATH = Path(__file__).with_name("sentiment_examples.json")
TEMPERATURE = 0.05
HEALTHCHECK_TIMEOUT_S = 10.0


def load_examples(path: str | Path = EXAMPLES_PATH) -> dict[str, list[str]]:
    """Labelled sentences: {"label": ["sentence", ...], ...}, at least two labels."""
    with open(path, encoding="utf-8") as fh:
        examples = json.load(fh)

    def is_sentences(texts: Any) -> bool:
        return isinstance(texts, list) and bool(texts) and all(isinstance(t, str) for t in texts)

    if not isinstance(examples, dict) or len(examples) < 2 or not all(map(is_sentences, examples.values())):
        raise ValueError(f"{path} must map each of at least two labels to a non-empty list of sentences")
    return examples


class NearestCentroid:
    """Label = the class whose mean example embedding is nearest by cosine; score = softmax probability."""

    def __init__(self, labels: list[str], centroids: np.ndarray, temperature: float = TEMPERATURE) -> None:
        self.labels = labels
        self.centroids = centroids / np.linalg.norm(centroids, axis=1, keepdims=True)
        self.temperature = temperature

    @classmethod
    def fit(cls, vectors_by_label: dict[str, Any], temperature: float = TEMPERATURE) -> NearestCentroid:
        labels = list(vectors_by_label)
        centroids = np.stack([np.asarray(vectors_by_label[lb], dtype=np.float32).mean(axis=0) for lb in labels])
        return cls(labels, centroids, temperature)

    def predict(self, vector: Any) -> tuple[str, float]:
        v = np.asarray(vector, dtype=np.float32)
        similarity = self.centroids @ (v / (np.linalg.norm(v) or 1.0))
        logits = (similarity - similarity.max()) / self.temperature
        probabilities = np.exp(logits) / np.exp(logits).sum()
        best = int(probabilities.argmax())
        return self.labels[best], float(probabilities[best])


class TextIn(BaseModel):
    text: str = Field(min_length=2)


api = FastAPI(title="Sentiment classifier", description="MiniLM embeddings, nearest labelled centroid")


@deployment(route_prefix="/")
@ingress(api)
class SentimentClassifier:
    def __init__(self, embedder: DeploymentHandle, examples_path: str = str(EXAMPLES_PATH)) -> None:
        self.embedder = embedder
        examples = load_examples(examples_path)
        every_text = [text for texts in examples.values() for text in texts]
        vectors = iter(embedder.embed.remote(every_text).result())  # one call, embedded as one batch
        self.head = NearestCentroid.fit({label: [next(vectors) for _ in texts] for label, texts in examples.items()})

    @api.get("/test")
    def root(self) -> str:
        return "Sentiment classifier: POST /classify?input_text=... -> {label: positive | negative, score}"

    @api.get("/healthcheck", status_code=200)
    async def healthcheck(self) -> Any:
        """200 when the model answers (one embedding through the batched Embedder), else 503."""
        try:
            await asyncio.wait_for(_awaited(self.embedder.embed.remote("healthcheck")), HEALTHCHECK_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - any failure means "not healthy"; say which
            error = f"{type(exc).__name__}: {exc}"
            return JSONResponse({"status": "unavailable", "error": error}, status_code=503)
        return "Classifier is all ready to go!"

    @api.post("/classify")
    async def predict_sentiment(
        self, input_text: str | None = Query(None, min_length=2), payload: TextIn | None = None
    ) -> dict[str, Any]:
        """Label `input_text` (query) or the JSON body's `text`; both need at least 2 characters."""
        text = input_text if input_text is not None else payload.text if payload is not None else None
        if text is None:  # the error FastAPI gives for a missing required query parameter
            raise RequestValidationError(
                [{"type": "missing", "loc": ("query", "input_text"), "msg": "Field required", "input": None}]
            )
        label, score = self.head.predict(await self.embedder.embed.remote(text))
        return {"text": text, "label": label, "score": round(score, 4)}


async def _awaited(response: Any) -> Any:
    return await response


app = SentimentClassifier.bind(Embedder.bind())
