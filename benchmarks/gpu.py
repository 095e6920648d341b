"""Served throughput of the MiniLM model on a GPU, batched against unbatched, in one run.

    python benchmarks/gpu.py [--seconds 12] [--concurrency 64] [--num-gpus 1]

The same measurement as `benchmarks/model_throughput.py`, with the raw model and the replicas on the
GPU: each served variant asks for `num_gpus`, so it goes to a GPU queue and its replicas are pinned to a
device (CUDA_VISIBLE_DEVICES) by the worker pool. Needs a CUDA machine: `nvidia-smi` must list a device.
"""

from __future__ import annotations

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    if shutil.which("nvidia-smi") is None and not os.environ.get("SERVE_GPU_DEVICES"):
        print("benchmarks/gpu.py needs a GPU machine (nvidia-smi not found)", file=sys.stderr)
        return 2
    from benchmarks import model_throughput

    sys.argv = [sys.argv[0], "--device", "cuda", *sys.argv[1:]]
    return model_throughput.main()


if __name__ == "__main__":
    sys.exit(main())
