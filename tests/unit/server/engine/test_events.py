"""Unit tests for latentcast.server.engine.events: the latent snapshot of a preview."""

from __future__ import annotations

import numpy as np
import torch

from latentcast.server.engine import LatentSnapshot, StepReport
from latentcast.server.previews import latent_to_fp16_bytes


def _latents(images: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(images, 4, 8, 6, generator=generator) * 3


def test_a_snapshot_is_the_first_image_in_float16() -> None:
    latents = _latents()
    snapshot = LatentSnapshot(latents)
    assert snapshot.shape == (4, 8, 6)
    assert snapshot.rgb is None
    array = snapshot.array()
    assert array.dtype == np.float16 and array.shape == (4, 8, 6)
    assert np.array_equal(array, latents[0].half().numpy())
    assert snapshot.fp16_bytes() == latent_to_fp16_bytes(latents[0])
    assert len(snapshot.fp16_bytes()) == 4 * 8 * 6 * 2
    assert snapshot.fp16_bytes() != latent_to_fp16_bytes(latents[1])


def test_a_snapshot_is_a_copy() -> None:
    """The engine goes on with the latents; the preview keeps the step's."""
    latents = _latents()
    expected = latent_to_fp16_bytes(latents[0])
    snapshot = LatentSnapshot(latents)
    latents.mul_(0)
    assert snapshot.fp16_bytes() == expected


def test_a_snapshot_of_a_float16_latent_is_still_a_copy() -> None:
    latents = _latents().half()
    snapshot = LatentSnapshot(latents)
    expected = latents[0].numpy().copy()
    latents.add_(1)
    assert np.array_equal(snapshot.array(), expected)


def test_a_snapshot_keeps_its_picture() -> None:
    rgb = np.zeros((64, 48, 3), dtype=np.uint8)
    assert LatentSnapshot(_latents(1), rgb).rgb is rgb


def test_a_step_report_defaults_to_no_calls() -> None:
    report = StepReport([])
    assert (report.events, report.unet_rows, report.seconds) == ([], [], 0.0)
