"""Traffic splits: several applications on one route prefix, each taking a share of its HTTP requests.

The split is a hash in Redis, route prefix -> {"app name": weight}; gateways read it with the
application specs (every second) and pick an application per request by smooth weighted round-robin, so the
observed shares follow the weights exactly rather than on average. Changing the weights changes only where
the next requests go: requests already queued finish where they are, so a canary is promoted or rolled back
without restarts and without failed requests. Applications named in a split but no longer deployed are
skipped; a prefix without a split is served by the application deployed there first (the incumbent), so a
new version deployed beside it takes no traffic until a split gives it some.
"""

from __future__ import annotations

import json
from typing import Any

TRAFFIC_KEY = "serve:traffic"


def parse_split(raw: Any) -> dict[str, float]:
    data = json.loads(raw)
    return {str(k): float(v) for k, v in data.items()}


class WeightedChooser:
    """Smooth weighted round-robin (as nginx does): over any run of sum(weights) picks, each name is picked
    exactly its weight's share of times, interleaved rather than in blocks."""

    def __init__(self, weights: dict[str, float]) -> None:
        self.weights = {name: w for name, w in weights.items() if w > 0}
        self.current = dict.fromkeys(self.weights, 0.0)
        self.total = sum(self.weights.values())

    def pick(self) -> str | None:
        if not self.weights:
            return None
        for name, weight in self.weights.items():
            self.current[name] += weight
        best = max(self.current, key=lambda n: self.current[n])
        self.current[best] -= self.total
        return best
