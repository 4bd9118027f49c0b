"""Phase 4: the VAE decode of jobs that finished, in one call, and their PIL images.

Follows the diffusers 0.42 pipelines' decode (SDXL's float32 upcast of a float16 VAE
that asks for it, its latents mean/std, its watermark when installed); inpainting jobs
are then composited onto their init image. One job decoded alone gives the pipeline's
bytes; jobs decoded together share one VAE call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from ..images import composite
from .prepare import PreparedJob


def decode(jobs: Sequence[PreparedJob], sdxl: bool) -> list[list[Image.Image]]:
    """Each job's finished images (all jobs: one model, one latent size)."""
    pipeline: Any = jobs[0].pipeline
    latents = jobs[0].latents if len(jobs) == 1 else torch.cat([job.latents for job in jobs])
    with torch.no_grad():
        if sdxl:
            pixels = _decode_sdxl(pipeline, latents)
        else:
            pixels = pipeline.vae.decode(
                latents / pipeline.vae.config.scaling_factor, return_dict=False
            )[0]
        images = pipeline.image_processor.postprocess(
            pixels, output_type="pil", do_denormalize=[True] * pixels.shape[0]
        )
    results = []
    start = 0
    for job in jobs:
        count = job.latents.shape[0]
        own = images[start : start + count]
        start += count
        request = job.request
        if request.mode == "inpaint":
            assert request.init_image is not None and request.mask is not None
            own = [composite(image, request.init_image, request.mask) for image in own]
        results.append(own)
    return results


def _decode_sdxl(pipeline: Any, latents: torch.Tensor) -> torch.Tensor:
    vae = pipeline.vae
    needs_upcasting = vae.dtype == torch.float16 and vae.config.force_upcast
    if needs_upcasting:
        pipeline.upcast_vae()
        latents = latents.to(next(iter(vae.post_quant_conv.parameters())).dtype)
    config = vae.config
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        mean_t = torch.tensor(mean).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(1, 4, 1, 1).to(latents.device, latents.dtype)
        latents = latents * std_t / config.scaling_factor + mean_t
    else:
        latents = latents / config.scaling_factor
    pixels: torch.Tensor = vae.decode(latents, return_dict=False)[0]
    if needs_upcasting:
        vae.to(dtype=torch.float16)
    watermark = getattr(pipeline, "watermark", None)
    if watermark is not None:
        pixels = watermark.apply_watermark(pixels)
    return pixels
