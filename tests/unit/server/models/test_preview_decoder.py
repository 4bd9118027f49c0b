"""Unit tests for latentcast.server.models.preview_decoder: the TAESD preview decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from latentcast.server.models import LoadedModel, ModelLoadError, load_model
from tests.fixtures.taesd import build_tiny_taesd


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_taesd(tmp_path_factory.mktemp("taesd") / "taesd")


def test_preview_decoder(tiny_cache: Path, taesd_dir: Path) -> None:
    from diffusers import AutoencoderTiny

    model = load_model("tiny", device="cpu", cache_dir=tiny_cache, preview_decoder=taesd_dir)
    decoder = model.preview_decoder
    assert isinstance(decoder, AutoencoderTiny)
    assert decoder.dtype == model.dtype
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    rgb = model.decode_preview(latent)
    assert rgb.dtype == np.uint8
    assert rgb.shape == (64, 64, 3)
    assert np.array_equal(rgb, model.decode_preview(latent))
    assert np.array_equal(rgb, model.decode_preview(latent[0]))
    # TAESD decodes the sampler's (scaled) latents as they are: scaling_factor 1.0.
    with torch.no_grad():
        direct = decoder.decode(latent).sample[0]
    expected = ((direct.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    assert np.array_equal(rgb, expected.numpy())


def test_decode_preview_without_decoder(tiny: LoadedModel) -> None:
    with pytest.raises(RuntimeError, match="no preview decoder"):
        tiny.decode_preview(torch.zeros(1, 4, 8, 8))


def test_preview_decoder_errors(tiny_cache: Path, tmp_path: Path) -> None:
    wrong = build_tiny_taesd(tmp_path / "taesd16", latent_channels=16)
    with pytest.raises(ModelLoadError, match="16-channel latents") as info:
        load_model("tiny", device="cpu", cache_dir=tiny_cache, preview_decoder=wrong)
    assert "4 latent channels" in str(info.value)
    with pytest.raises(ModelLoadError, match="preview decoder"):
        load_model("tiny", device="cpu", cache_dir=tiny_cache, preview_decoder=tmp_path / "no")
