"""server/engine/prepare.py, the controls: the image tensor a ControlNet takes, and the
start/end rule (the ControlNet pipelines' ``prepare_image`` and ``controlnet_keep``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentcast.server.engine.prepare import PreparedControl, prepare
from latentcast.server.engine.prompts import PromptCache
from latentcast.server.jobs import JobControl
from latentcast.server.models import LoadedModel, load_model
from tests.fixtures.controlnets import build_tiny_controlnet

from .support import make_request


@pytest.fixture(scope="module")
def tiny_controlled(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = build_tiny_controlnet(tmp_path_factory.mktemp("controlnet") / "sd1")
    return load_model(
        "tiny", device="cpu", cache_dir=model_cache, controlnets={"a": folder, "b": folder}
    )


def _keeps(control: PreparedControl, steps: int) -> list[float]:
    return [control.weight(i, steps) for i in range(steps)]


def test_the_weight_is_the_scale_inside_the_window_as_the_pipelines_keep() -> None:
    def make(scale: float, start: float, end: float) -> PreparedControl:
        return PreparedControl("a", torch.zeros(1), scale, start, end)

    assert _keeps(make(0.5, 0.0, 1.0), 4) == [0.5] * 4
    assert _keeps(make(1.0, 0.5, 1.0), 4) == [0.0, 0.0, 1.0, 1.0]
    assert _keeps(make(2.0, 0.0, 0.5), 4) == [2.0, 2.0, 0.0, 0.0]
    # A step counts only when it lies wholly inside: [0.3, 0.6] of 4 steps holds none.
    assert _keeps(make(1.0, 0.3, 0.6), 4) == [0.0] * 4
    assert _keeps(make(1.0, 0.25, 0.75), 4) == [0.0, 1.0, 1.0, 0.0]
    # Exactly diffusers' expression.
    steps, start, end = 7, 0.2, 0.9
    keep = [1.0 - float(i / steps < start or (i + 1) / steps > end) for i in range(steps)]
    assert _keeps(make(1.0, start, end), steps) == keep


def test_a_job_s_controls_are_sorted_by_name_and_shaped_for_its_rows(
    tiny_controlled: LoadedModel,
) -> None:
    white = Image.new("RGB", (64, 48), "white")
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[:, :32] = 255
    half = Image.fromarray(pixels)
    request = make_request(
        width=64,
        height=48,
        num_images=2,
        controls=(JobControl("b", white, scale=0.5), JobControl("a", half, end=0.5)),
    )
    job = prepare(tiny_controlled, PromptCache(4), request)
    assert [control.name for control in job.controls] == ["a", "b"]
    first, second = job.controls
    assert (first.scale, first.end, second.scale) == (1.0, 0.5, 0.5)
    # Guided, two images: four rows [uncond x 2, cond x 2], each with the image, 0..1.
    assert job.rows == 4
    assert first.image.shape == second.image.shape == (4, 3, 48, 64)
    assert first.image.dtype == tiny_controlled.dtype
    assert torch.equal(second.image, torch.ones_like(second.image))
    assert torch.equal(first.image[:, :, :, :32], torch.ones(4, 3, 48, 32))
    assert torch.equal(first.image[:, :, :, 32:], torch.zeros(4, 3, 48, 32))


def test_an_unguided_job_has_one_row_per_image(tiny_controlled: LoadedModel) -> None:
    image = Image.new("RGB", (64, 64), "white")
    request = make_request(guidance_scale=1.0, controls=(JobControl("a", image),))
    (control,) = prepare(tiny_controlled, PromptCache(4), request).controls
    assert control.image.shape == (1, 3, 64, 64)


def test_a_job_without_controls_has_none(tiny_controlled: LoadedModel) -> None:
    assert prepare(tiny_controlled, PromptCache(4), make_request()).controls == ()
