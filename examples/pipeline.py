"""A real three-step pipeline, run as a Celery chain, and a fan-out example.

    celery-serve run examples.pipeline:app
    curl 'http://127.0.0.1:8000/?text=What+a+WONDERFUL+day!!'
        ->  {"label": "positive", "score": 0.98, "text": "what a wonderful day!"}

    celery-serve run examples.pipeline:fanout
    curl -d '"The service was slow and the food was cold."' http://127.0.0.1:8000/
        ->  {"sentiment": {"label": "negative", ...}, "stats": {"words": 9, ...}}

`app` is normalize (CPU) >> Embed (MiniLM, batched; on a GPU queue when a GPU is there) >> Classify.
Each step's result goes straight to the next step's queue; nothing comes back to a waiting ingress.
Embed asks for a quarter of a GPU (`num_gpus=0.25`: four replicas share one device) and may fall back to
the CPU here (`allow_cpu_fallback=True`), so the example runs on a laptop.

`fanout` sends the normalized text to two deployments at once, `parallel(Sentiment, TextStats)`, and
hands both results to `Report`.
"""

from __future__ import annotations

import re
from typing import Any

from celery_serve import DeploymentHandle, batch, deployment, get_replica_context, parallel
from examples._model import Encoder
from examples.sentiment import NearestCentroid, load_examples

_SPACES = re.compile(r"\s+")
_REPEATS = re.compile(r"([!?.])\1+")
_URLS = re.compile(r"https?://\S+")


def text_of(value: Any) -> str:
    """The text of a pipeline input: a string, {"text": ...}, or an HTTP request (query `text` or body)."""
    if hasattr(value, "query_params"):  # the first step of an HTTP call receives the request
        if "text" in value.query_params:
            value = str(value.query_params["text"])
        else:
            value = value.json_sync() if value.body_sync() else ""
    if isinstance(value, dict):
        value = value.get("text", "")
    if not isinstance(value, str) or len(value.strip()) < 2:
        from celery_serve import BadRequestError

        raise BadRequestError('send a text of at least 2 characters: ?text=..., a JSON string, or {"text": ...}')
    return value


@deployment
def normalize(value: Any) -> str:
    """Lowercase, drop links, fold repeated punctuation and whitespace."""
    text = _URLS.sub(" ", text_of(value)).lower()
    return _SPACES.sub(" ", _REPEATS.sub(r"\1", text)).strip()


@deployment(num_gpus=0.25, allow_cpu_fallback=True)
class Embed:
    def __init__(self) -> None:
        context = get_replica_context()  # cuda:0 on its GPU; cpu here (allow_cpu_fallback)
        self.encoder = Encoder(context.num_threads, device=str(context.device))

    @batch(max_batch_size=32, batch_wait_timeout_s=0.002)
    def __call__(self, texts: list[str]) -> list[dict[str, Any]]:
        vectors = self.encoder.encode(texts)
        return [{"text": t, "vector": v.tolist()} for t, v in zip(texts, vectors, strict=True)]


def _fit_head(embed: DeploymentHandle) -> NearestCentroid:
    examples = load_examples()
    responses = {label: [embed.remote(t) for t in texts] for label, texts in examples.items()}
    return NearestCentroid.fit({label: [r.result()["vector"] for r in rs] for label, rs in responses.items()})


@deployment
class Classify:
    """Nearest labelled centroid over the embedding (the head of examples.sentiment)."""

    def __init__(self, embed: DeploymentHandle) -> None:
        self.head = _fit_head(embed)

    def __call__(self, embedded: dict[str, Any]) -> dict[str, Any]:
        label, score = self.head.predict(embedded["vector"])
        return {"label": label, "score": round(score, 4), "text": embedded["text"]}


embed = Embed.bind()
app = normalize.bind() >> embed >> Classify.bind(embed)


@deployment
class Sentiment:
    def __init__(self, embed: DeploymentHandle) -> None:
        self.embed = embed
        self.head = _fit_head(embed)

    async def __call__(self, text: str) -> dict[str, Any]:
        label, score = self.head.predict((await self.embed.remote(text))["vector"])
        return {"label": label, "score": round(score, 4)}


@deployment
def text_stats(text: str) -> dict[str, Any]:
    words = text.split()
    return {"words": len(words), "characters": len(text), "exclamations": text.count("!")}


@deployment
def report(parts: list[dict[str, Any]]) -> dict[str, Any]:
    sentiment, stats = parts
    return {"sentiment": sentiment, "stats": stats}


fanout = normalize.bind() >> parallel(Sentiment.bind(embed), text_stats.bind()) >> report.bind()
