"""Unit tests for latentcast.server.models.modes: the per-mode pipelines (txt2img, img2img,
inpaint) sharing one copy of the weights, and the dedicated inpainting UNet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from latentcast.server.models import SD1_FAMILY, SDXL_FAMILY, LoadedModel, load_model
from tests.unit.server.models.support import PROMPT, _init_image


@pytest.fixture(scope="module")
def tiny_inpaint(tiny_cache: Path) -> LoadedModel:
    return load_model("tiny-inpaint", device="cpu", cache_dir=tiny_cache)


@pytest.mark.parametrize("model_name", ["tiny", "tiny_sdxl"])
def test_mode_pipelines_share_the_weights(model_name: str, request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue(model_name)
    sdxl = model.family is SDXL_FAMILY
    prefix = "StableDiffusionXL" if sdxl else "StableDiffusion"
    expected = {"txt2img": "Pipeline", "img2img": "Img2ImgPipeline", "inpaint": "InpaintPipeline"}
    assert model.pipeline_for("txt2img") is model.pipeline
    for mode in model.modes:
        pipeline = model.pipeline_for(mode)
        assert type(pipeline).__name__ == prefix + expected[mode]
        assert pipeline.unet is model.pipeline.unet
        assert pipeline.vae is model.pipeline.vae
        assert pipeline.text_encoder is model.pipeline.text_encoder
        if sdxl:
            assert pipeline.text_encoder_2 is model.pipeline.text_encoder_2
    assert model.pipeline_for("img2img") is model.pipeline_for("img2img")  # built once


def test_pipeline_for_unknown_mode(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="upscale"):
        tiny.pipeline_for("upscale")


def _mask(value: int) -> Image.Image:
    return Image.fromarray(np.full((64, 64), value, dtype=np.uint8))


@pytest.mark.parametrize("model_name", ["tiny", "tiny_sdxl"])
def test_img2img_and_inpaint_run(model_name: str, request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue(model_name)
    common: dict[str, Any] = {"num_inference_steps": 4, "output_type": "np"}
    img2img = model.pipeline_for("img2img")(
        PROMPT,
        image=_init_image(),
        strength=0.5,
        generator=torch.Generator().manual_seed(1),
        **common,
    ).images[0]
    assert img2img.shape == (64, 64, 3)
    inpaint = model.pipeline_for("inpaint")
    images = [
        inpaint(
            prompt,
            image=_init_image(),
            mask_image=_mask(value),
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(1),
            **common,
        ).images[0]
        for prompt, value in ((PROMPT, 0), ("a dog", 0), (PROMPT, 255), ("a dog", 255))
    ]
    # 4-channel UNet: the kept region (black mask: all of it) is blended back from the
    # init image's latents at every step, so the prompt cannot change it ...
    assert np.array_equal(images[0], images[1])
    # ... while in a repainted region (white) the prompt matters.
    assert not np.array_equal(images[2], images[3])


def test_inpainting_unet_model(tiny_inpaint: LoadedModel) -> None:
    assert tiny_inpaint.inpaint_unet is True
    assert tiny_inpaint.modes == ("inpaint",)
    assert tiny_inpaint.family is SD1_FAMILY
    assert type(tiny_inpaint.pipeline).__name__ == "StableDiffusionInpaintPipeline"
    assert tiny_inpaint.pipeline_for("inpaint") is tiny_inpaint.pipeline
    for mode in ("txt2img", "img2img"):
        with pytest.raises(ValueError, match="not available"):
            tiny_inpaint.pipeline_for(mode)

    def inpaint(seed: int) -> np.ndarray:
        image: np.ndarray = tiny_inpaint.pipeline(
            PROMPT,
            image=_init_image(),
            mask_image=_mask(255),
            height=64,
            width=64,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]
        return image

    first = inpaint(5)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, inpaint(5))
