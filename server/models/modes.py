"""Generation modes, and the diffusers pipeline classes that run them per family."""

from __future__ import annotations

from types import MappingProxyType

#: Generation modes (the protocol's ``model.modes`` values).
TXT2IMG = "txt2img"
IMG2IMG = "img2img"
INPAINT = "inpaint"
MODES = (TXT2IMG, IMG2IMG, INPAINT)

# Pipeline classes by family and mode (diffusers class names).
_SD_PIPELINES = MappingProxyType(
    {
        TXT2IMG: "StableDiffusionPipeline",
        IMG2IMG: "StableDiffusionImg2ImgPipeline",
        INPAINT: "StableDiffusionInpaintPipeline",
    }
)
_SDXL_PIPELINES = MappingProxyType(
    {
        TXT2IMG: "StableDiffusionXLPipeline",
        IMG2IMG: "StableDiffusionXLImg2ImgPipeline",
        INPAINT: "StableDiffusionXLInpaintPipeline",
    }
)
# Pipelines whose constructor takes the SD 1.x/2.x safety checker arguments.
_SAFETY_CHECKER_KWARGS = MappingProxyType(
    {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
)
# A UNet with this many input channels is a dedicated inpainting model
# (4 noisy latent + 1 mask + 4 masked-image latent channels).
_INPAINT_UNET_CHANNELS = 9
