"""Fixtures of the engine unit tests: the tiny models, loaded once per test module from
the session cache (built by the top-level conftest), and tiny LoRAs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from latentcast.server.models import LoadedModel, load_model
from tests.fixtures.loras import build_tiny_lora


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Every test here runs the model on the test's thread, with one intra-op thread.

    These tests compare images, not speed; on a small shared machine two intra-op threads
    contending with other processes make each UNet call tens of times slower. (The
    setting is the calling thread's, and pytest runs every test on one thread.)
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(model_cache: Path) -> LoadedModel:
    return load_model("tiny", device="cpu", cache_dir=model_cache)


@pytest.fixture(scope="module")
def tiny_sdxl(model_cache: Path) -> LoadedModel:
    return load_model("tiny-sdxl", device="cpu", cache_dir=model_cache)


@pytest.fixture(scope="module")
def tiny_inpaint(model_cache: Path) -> LoadedModel:
    return load_model("tiny-inpaint", device="cpu", cache_dir=model_cache)


@pytest.fixture(scope="package")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two tiny LoRAs for the tiny model, "a" and "b", that visibly change its images."""
    root = tmp_path_factory.mktemp("loras")
    return {"a": build_tiny_lora(root / "a", seed=1), "b": build_tiny_lora(root / "b", seed=2)}


@pytest.fixture(scope="module")
def tiny_lora(model_cache: Path, lora_files: dict[str, Path]) -> LoadedModel:
    """The tiny model with LoRAs "a" and "b" loaded (all inactive until selected)."""
    return load_model("tiny", device="cpu", cache_dir=model_cache, loras=lora_files)
