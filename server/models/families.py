"""Architecture families (SD 1.x, SD 2.x, SDXL): latent previews, native size, detection."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any


@dataclass(frozen=True)
class LatentRGB:
    """Linear approximation latent -> RGB, used for cheap previews.

    ``rgb[k] = sum_c latent[c] * factors[c][k] + bias[k]`` gives values roughly in
    -1..1. The factors apply to the latents as the diffusers pipeline holds them
    during denoising (i.e. already multiplied by the VAE scaling factor).
    """

    factors: tuple[tuple[float, float, float], ...]
    bias: tuple[float, float, float]


@dataclass(frozen=True)
class ModelFamily:
    """An architecture family: latent layout, preview factors and native image size.

    ``default_size`` is the side the family was trained at (SD 1.x: 512, SD 2.x:
    768 or 512 for the "base" variant, SDXL: 1024). A loaded model's own
    :attr:`LoadedModel.default_size` comes from its UNet config and may differ (the
    tiny models use 64).
    """

    name: str
    latent_rgb: LatentRGB | None
    default_size: int


# The well-known SD 1.5 factors (ComfyUI comfy/latent_formats.py, class SD15, which
# defines no bias). SD 2.x shares the same VAE, and ComfyUI's SD20 model uses the
# SD15 latent format, so the factors serve it as well.
_SD15_LATENT_RGB = LatentRGB(
    factors=(
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
    bias=(0.0, 0.0, 0.0),
)
SD1_FAMILY = ModelFamily(name="sd1", latent_rgb=_SD15_LATENT_RGB, default_size=512)
#: SD 2.x at 768 (v-prediction "SD 2.x 768" models). 512 variants are
#: ``dataclasses.replace(SD2_FAMILY, default_size=512)``.
SD2_FAMILY = ModelFamily(name="sd2", latent_rgb=_SD15_LATENT_RGB, default_size=768)
# ComfyUI comfy/latent_formats.py, class SDXL (latent_rgb_factors and
# latent_rgb_factors_bias). Turbo/Lightning style few-step SDXL models share them.
SDXL_FAMILY = ModelFamily(
    name="sdxl",
    latent_rgb=LatentRGB(
        factors=(
            (0.3651, 0.4232, 0.4341),
            (-0.2533, -0.0042, 0.1068),
            (0.1076, 0.1111, -0.0362),
            (-0.3165, -0.2492, -0.2188),
        ),
        bias=(0.1084, -0.0175, -0.0011),
    ),
    default_size=1024,
)
# OpenCLIP ViT-H (SD 2.x) text features are 1024 wide; CLIP ViT-L (SD 1.x) 768.
_SD2_CROSS_ATTENTION_DIM = 1024


def detect_family(pipeline: Any) -> ModelFamily:
    """The family of a loaded pipeline, decided from its classes and configs only.

    * SDXL: any ``StableDiffusionXL*`` pipeline class, or a UNet with
      ``addition_embed_type == "text_time"`` (SDXL micro-conditioning);
    * SD 2.x: a UNet with ``cross_attention_dim == 1024`` (OpenCLIP ViT-H text
      encoder); ``default_size`` 768 when ``sample_size * vae_scale_factor`` is 768,
      else 512;
    * SD 1.x: everything else.
    """
    unet_config = pipeline.unet.config
    if type(pipeline).__name__.startswith("StableDiffusionXL") or (
        unet_config.get("addition_embed_type") == "text_time"
    ):
        return SDXL_FAMILY
    cross_attention_dim = unet_config.get("cross_attention_dim")
    if cross_attention_dim == _SD2_CROSS_ATTENTION_DIM:
        size = _sample_size(pipeline) * int(pipeline.vae_scale_factor)
        return SD2_FAMILY if size == 768 else replace(SD2_FAMILY, default_size=512)
    return SD1_FAMILY


def _sample_size(pipeline: Any) -> int:
    sample_size = pipeline.unet.config.sample_size
    if isinstance(sample_size, (list, tuple)):
        sample_size = max(sample_size)
    return int(sample_size)
