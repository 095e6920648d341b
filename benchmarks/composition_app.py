"""Three small steps composed two ways, for benchmarks/composition.py: as a chain and through handles.

The steps do little work on purpose, so the figures show what each way of composing costs.
"""

from __future__ import annotations

from typing import Any

from celery_serve import DeploymentHandle, deployment


def _text(value: Any) -> str:
    return str(value.query_params.get("text", "")) if hasattr(value, "query_params") else str(value)


@deployment(max_queued_requests=-1)
def clean(value: Any) -> str:
    return " ".join(_text(value).lower().split())


@deployment(max_queued_requests=-1)
def tokenize(text: str) -> list[str]:
    return text.split()


@deployment(max_queued_requests=-1)
def score(tokens: list[str]) -> dict[str, Any]:
    positive = sum(t in {"good", "great", "love"} for t in tokens)
    return {"tokens": len(tokens), "positive": positive}


@deployment(max_queued_requests=-1)
class Orchestrator:
    """The same three steps, called one after another from an async ingress through handles."""

    def __init__(self, clean: DeploymentHandle, tokenize: DeploymentHandle, score: DeploymentHandle) -> None:
        self.clean, self.tokenize, self.score = clean, tokenize, score

    async def __call__(self, request: Any) -> dict[str, Any]:
        text = await self.clean.remote(_text(request))
        tokens = await self.tokenize.remote(text)
        return await self.score.remote(tokens)


chain = clean.bind() >> tokenize.bind() >> score.bind()
handles = Orchestrator.bind(clean.bind(), tokenize.bind(), score.bind())
