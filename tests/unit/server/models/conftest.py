"""Fixtures shared by the tests of latentcast.server.models: the tiny models, loaded
once per test module from the session cache (built by the top-level conftest)."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentcast.server.models import LoadedModel, load_model


@pytest.fixture(scope="module")
def tiny_cache(model_cache: Path) -> Path:
    """The session's model cache (tiny built there by conftest; the others on demand)."""
    return model_cache


@pytest.fixture(scope="module")
def tiny(tiny_cache: Path) -> LoadedModel:
    return load_model("tiny", device="cpu", cache_dir=tiny_cache)


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_cache: Path) -> LoadedModel:
    return load_model("tiny-sdxl", device="cpu", cache_dir=tiny_cache)
