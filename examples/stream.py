"""A token streamer: a small character-level language model, built and trained in the replica, that streams
its text as it generates it.

    celery-serve run examples.stream:app
    curl -N 'http://127.0.0.1:8000/?prompt=the+queue&max_tokens=80'                 # text, as it is generated
    curl -N -H 'Accept: text/event-stream' 'http://127.0.0.1:8000/?prompt=the'      # server-sent events
    curl -N 'http://127.0.0.1:8000/jobs/<X-Request-ID>/stream?from=20'               # resume at token 20

The model is real torch (an embedding, a GRU and a linear head over characters), trained for a few hundred
steps on the paragraph below at start-up with a fixed seed, so every replica builds the same weights and
the same prompt always streams the same text. Each token is one chunk: the gateway writes it to the client
as soon as the replica yields it, and the response's `X-Request-ID` resumes it after a dropped connection.
From Python: `handle.options(stream=True).generate.remote("the queue", 40)` yields the same tokens.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

from starlette.requests import Request
from starlette.responses import StreamingResponse

from celery_serve import deployment

SEED = 1234
CORPUS = (
    "the queue holds the request until a replica is free. the replica takes the request, runs the model and "
    "streams the answer back, token by token. the gateway writes each token to the client as it comes. "
    "if the client drops, the stream stays in redis, and the client resumes where it left off. "
)
MAX_TOKENS = 400


class CharModel:
    """A character-level GRU language model, trained on `CORPUS` when built (deterministic)."""

    def __init__(self, steps: int = 150, hidden: int = 64) -> None:
        import torch

        torch.manual_seed(SEED)
        self.torch = torch
        self.vocab = sorted(set(CORPUS))
        self.index = {c: i for i, c in enumerate(self.vocab)}
        n = len(self.vocab)
        self.embed = torch.nn.Embedding(n, 32)
        self.gru = torch.nn.GRU(32, hidden, batch_first=True)
        self.head = torch.nn.Linear(hidden, n)
        self._train(steps)

    def _parameters(self) -> list[Any]:
        return [*self.embed.parameters(), *self.gru.parameters(), *self.head.parameters()]

    def _train(self, steps: int, window: int = 48, batch: int = 16) -> None:
        torch = self.torch
        data = torch.tensor([self.index[c] for c in CORPUS])
        optimizer = torch.optim.Adam(self._parameters(), lr=0.01)
        generator = torch.Generator().manual_seed(SEED)
        for _ in range(steps):
            starts = torch.randint(0, len(data) - window - 1, (batch,), generator=generator)
            x = torch.stack([data[s : s + window] for s in starts])
            y = torch.stack([data[s + 1 : s + window + 1] for s in starts])
            out, _ = self.gru(self.embed(x))
            loss = torch.nn.functional.cross_entropy(self.head(out).reshape(-1, len(self.vocab)), y.reshape(-1))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    def generate(self, prompt: str, max_tokens: int, temperature: float = 0.6) -> Iterator[str]:
        """Yield one character at a time, sampled with a fixed seed (the same prompt gives the same text)."""
        torch = self.torch
        known = [self.index[c] for c in prompt.lower() if c in self.index] or [self.index[" "]]
        generator = torch.Generator().manual_seed(SEED)
        with torch.inference_mode():
            out, state = self.gru(self.embed(torch.tensor([known])))
            logits = self.head(out[:, -1])
            for _ in range(max_tokens):
                probs = torch.softmax(logits / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
                yield self.vocab[token]
                out, state = self.gru(self.embed(torch.tensor([[token]])), state)
                logits = self.head(out[:, -1])


def _max_tokens(raw: Any) -> int:
    try:
        value = int(raw)
    except (TypeError, ValueError):
        value = -1
    if not 1 <= value <= MAX_TOKENS:
        from celery_serve import BadRequestError

        raise BadRequestError(f"max_tokens must be an integer from 1 to {MAX_TOKENS}, got {raw!r}")
    return value


@deployment(max_ongoing_requests=32)
class TokenStreamer:
    def __init__(self) -> None:
        self.model = CharModel()

    async def generate(self, prompt: str, max_tokens: int = 60) -> AsyncIterator[str]:
        """Tokens for handle and client callers (`handle.options(stream=True).generate.remote(...)`)."""
        for token in self.model.generate(prompt, _max_tokens(max_tokens)):
            yield token
            await asyncio.sleep(0)  # let the replica write the token (and serve others) between steps

    async def __call__(self, request: Request) -> StreamingResponse:
        prompt = request.query_params.get("prompt", "the")
        max_tokens = _max_tokens(request.query_params.get("max_tokens", "60"))
        if "text/event-stream" in request.headers.get("accept", ""):

            async def events() -> AsyncIterator[str]:
                async for token in self.generate(prompt, max_tokens):
                    yield f"data: {token}\n\n"

            return StreamingResponse(events(), media_type="text/event-stream")
        return StreamingResponse(self.generate(prompt, max_tokens), media_type="text/plain; charset=utf-8")


app = TokenStreamer.bind()
