"""`get_replica_context()` needs no torch: `device` is a string without it and a `torch.device` with it."""

from __future__ import annotations

import sys

import pytest

from celery_serve import get_replica_context


def test_device_is_a_string_when_torch_is_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError
    monkeypatch.setenv("SERVE_REPLICA_DEVICE", "cuda")
    assert get_replica_context().device == "cuda:0"
    monkeypatch.setenv("SERVE_REPLICA_DEVICE", "cpu")
    assert get_replica_context().device == "cpu"


def test_device_is_a_torch_device_when_torch_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("SERVE_REPLICA_DEVICE", "cpu")
    assert get_replica_context().device == torch.device("cpu")


def test_importing_celery_serve_does_not_import_torch() -> None:
    import subprocess

    code = "import sys, celery_serve, celery_serve.workers.replica; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
