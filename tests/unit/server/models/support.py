"""Helpers shared by the tests of latentcast.server.models."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from latentcast.server.models import LoadedModel

PROMPT = "a photo of a cat"


def _generate(
    model: LoadedModel, *, seed: int = 42, steps: int = 2, prompt: str = PROMPT, **kwargs: Any
) -> np.ndarray:
    """One 64x64 txt2img image as a float array (exact comparisons)."""
    result = model.pipeline(
        prompt,
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **kwargs,
    )
    image: np.ndarray = result.images[0]
    return image


def _init_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
