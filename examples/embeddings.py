"""Sentence embeddings (all-MiniLM-L6-v2, 384 dimensions), batched across callers with `@batch`.

    celery-serve run examples.embeddings:app
    curl -d '"The weather is lovely today"' http://127.0.0.1:8000/          ->  {"embedding": [384 floats]}
    curl -d '{"text": "The weather is lovely today"}' http://127.0.0.1:8000/  ->  the same
    curl -d '{"texts": ["first", "second"]}' http://127.0.0.1:8000/         ->  {"embeddings": [[...], [...]]}
    curl -d '["first", "second"]' http://127.0.0.1:8000/                    ->  the same

From another deployment, through a handle: `await embedder.embed.remote("a text")` gives 384 floats, and
`embedder.embed.remote(["a", "b"])` a list of them.

Every caller sends one item; the replica hands each `@batch` method up to 32 waiting requests at once, so
under load the model runs once for many requests. HTTP requests reach the batched `__call__` directly, as a
list of Starlette requests: there is no ingress deployment in front, so each request makes one trip through
the queue, not two. A request that carries a list of texts joins the same model call as the others.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from celery_serve import batch, deployment, get_replica_context
from celery_serve.exceptions import BadRequestError
from examples._model import Encoder

NUM_CPUS = 1  # a replica's torch threads; on a 2-core machine the other core serves the gateway and Redis
MAX_BATCH_SIZE = 32
BATCH_WAIT_TIMEOUT_S = 0.002
MAX_TEXTS_PER_REQUEST = 256

Texts = str | list[str]


def read_texts(body: Any) -> Texts:
    """The text or texts a request carries: "text", {"text": "..."}, {"texts": [...]} or ["...", ...]."""
    if isinstance(body, dict):
        if "text" in body and "texts" not in body:
            body = body["text"]
            if not isinstance(body, str):
                raise BadRequestError(f'"text" must be a string, got {type(body).__name__}')
        elif "texts" in body and "text" not in body:
            body = body["texts"]
            if not isinstance(body, list):
                raise BadRequestError(f'"texts" must be a list of strings, got {type(body).__name__}')
        else:
            raise BadRequestError('send {"text": "..."} or {"texts": ["...", ...]}, not both or neither')
    if isinstance(body, str):
        return body
    if isinstance(body, list):
        if len(body) > MAX_TEXTS_PER_REQUEST:
            raise BadRequestError(f"at most {MAX_TEXTS_PER_REQUEST} texts per request, got {len(body)}")
        for i, text in enumerate(body):
            if not isinstance(text, str):
                raise BadRequestError(f"texts[{i}] must be a string, got {type(text).__name__}")
        return body
    raise BadRequestError(
        'the body must be a JSON string, {"text": "..."}, {"texts": [...]} or a list of strings, '
        f"got {type(body).__name__}"
    )


@deployment(num_cpus=NUM_CPUS)
class Embedder:
    def __init__(self) -> None:
        # num_threads is this deployment's num_cpus (set per replica by its worker pool)
        context = get_replica_context()  # on a GPU when the deployment asks for one (num_gpus), else the CPU
        self.encoder = Encoder(context.num_threads, batch_size=MAX_BATCH_SIZE, device=str(context.device))

    @batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    def __call__(self, requests: list[Request]) -> list[Any]:
        """HTTP: one request per caller, each body one text or a list of texts."""
        items: list[Texts | Exception] = []
        for request in requests:
            try:
                items.append(read_texts(request.json_sync()))  # type: ignore[attr-defined]
            except BadRequestError as exc:
                items.append(exc)
        results = self._embed_items(items)
        for i, (item, value) in enumerate(zip(items, results, strict=True)):
            if not isinstance(value, Exception):
                results[i] = {"embeddings": value} if isinstance(item, list) else {"embedding": value}
        return results

    @batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    def embed(self, texts: list[Texts]) -> list[Any]:
        """Handles: each caller passes one text (gets 384 floats) or a list of texts (gets a list of them)."""
        items: list[Texts | Exception] = []
        for text in texts:
            try:
                items.append(read_texts(text))
            except BadRequestError as exc:
                items.append(exc)
        return self._embed_items(items)

    def _embed_items(self, items: list[Texts | Exception]) -> list[Any]:
        """Embed every text of every item in one model call; errors stay in their item's place."""
        flat: list[str] = []
        for item in items:
            if isinstance(item, str):
                flat.append(item)
            elif isinstance(item, list):
                flat.extend(item)
        vectors = self.encoder.encode(flat).tolist()
        results: list[Any] = []
        at = 0
        for item in items:
            if isinstance(item, Exception):
                results.append(item)
            elif isinstance(item, str):
                results.append(vectors[at])
                at += 1
            else:
                results.append(vectors[at : at + len(item)])
                at += len(item)
        return results


app = Embedder.bind()
