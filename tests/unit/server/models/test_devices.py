"""Unit tests for latentcast.server.models.devices: device resolution and dtypes."""

from __future__ import annotations

import re

import pytest
import torch

from latentcast.server.models import default_dtype, resolve_device


def test_resolve_device_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a CPU-only host"
)
def test_resolve_device_auto_and_unavailable() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:1", "mps"):
        with pytest.raises(ValueError, match="not available"):
            resolve_device(spec)


def test_resolve_device_cuda_index_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu0", "", "cuda:x", "meta"])
def test_resolve_device_invalid(spec: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        resolve_device(spec)


def test_default_dtype() -> None:
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.float16
    assert default_dtype(torch.device("mps")) == torch.float16
