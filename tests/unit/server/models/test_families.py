"""Unit tests for latentcast.server.models.families: the families and their detection."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from latentcast.server.models import SD1_FAMILY, SD2_FAMILY, SDXL_FAMILY, detect_family


class _Config(dict[str, Any]):
    """A dict with attribute access, like diffusers' FrozenDict configs."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


def _fake_pipeline(cls_name: str = "StableDiffusionPipeline", **unet_config: Any) -> Any:
    config = _Config(sample_size=64, cross_attention_dim=768, addition_embed_type=None)
    config.update(unet_config)
    fake_cls = type(cls_name, (), {})
    pipeline = fake_cls()
    pipeline.unet = SimpleNamespace(config=config)
    pipeline.vae_scale_factor = 8
    return pipeline


def test_detect_family_from_the_pipeline() -> None:
    assert detect_family(_fake_pipeline()) is SD1_FAMILY
    assert detect_family(_fake_pipeline(cross_attention_dim=1024, sample_size=96)) is SD2_FAMILY
    sd2_base = detect_family(_fake_pipeline(cross_attention_dim=1024, sample_size=64))
    assert (sd2_base.name, sd2_base.default_size) == ("sd2", 512)
    assert sd2_base.latent_rgb == SD2_FAMILY.latent_rgb
    text_time = _fake_pipeline(addition_embed_type="text_time", cross_attention_dim=2048)
    assert detect_family(text_time) is SDXL_FAMILY
    assert detect_family(_fake_pipeline("StableDiffusionXLImg2ImgPipeline")) is SDXL_FAMILY


def test_family_constants() -> None:
    assert (SD1_FAMILY.name, SD1_FAMILY.default_size) == ("sd1", 512)
    assert (SD2_FAMILY.name, SD2_FAMILY.default_size) == ("sd2", 768)
    assert (SDXL_FAMILY.name, SDXL_FAMILY.default_size) == ("sdxl", 1024)
    # SD 2.x shares SD 1.x's VAE; ComfyUI uses the SD15 latent format for it.
    assert SD2_FAMILY.latent_rgb == SD1_FAMILY.latent_rgb
    assert replace(SD2_FAMILY, default_size=512) != SD2_FAMILY


def test_sd1_family_factors() -> None:
    assert SD1_FAMILY.latent_rgb is not None
    assert len(SD1_FAMILY.latent_rgb.factors) == 4
    assert all(len(row) == 3 for row in SD1_FAMILY.latent_rgb.factors)
    assert SD1_FAMILY.latent_rgb.factors[0] == (0.3512, 0.2297, 0.3227)
    assert SD1_FAMILY.latent_rgb.bias == (0.0, 0.0, 0.0)


def test_sdxl_family_factors() -> None:
    # ComfyUI comfy/latent_formats.py, class SDXL.
    rgb = SDXL_FAMILY.latent_rgb
    assert rgb is not None
    assert rgb.factors == (
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    )
    assert rgb.bias == (0.1084, -0.0175, -0.0011)
