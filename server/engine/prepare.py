"""Phase 1 of a job: everything its denoising steps need, made once when it joins.

:func:`prepare` follows the diffusers 0.42 pipelines' ``__call__`` up to their denoising
loop, phase by phase and with the pipelines' own helpers (``encode_prompt``,
``prepare_latents``, ``get_timesteps``, ``prepare_mask_latents``, ``_get_add_time_ids``,
the image processors), so that the same tensors come out and a job that runs alone gives
the bytes of :func:`diffusers_arguments` passed to the pipeline. What it makes is a
:class:`PreparedJob`: the job's own scheduler and generators, its latents, and the
conditioning its UNet rows take at every step.

A job has ``num_images`` images; with classifier-free guidance each image takes two UNet
rows (unconditional first, as in the pipelines: ``[uncond x k, cond x k]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from latentcast.protocol.limits import SEED_SPACE

from ..jobs import GenerationRequest, JobControl
from ..models import LoadedModel
from .prompts import PromptCache, prompt_warnings, uses_guidance

#: The pipelines' default aesthetic scores (SDXL img2img and inpaint time ids).
_AESTHETIC_SCORE = 6.0
_NEGATIVE_AESTHETIC_SCORE = 2.5
_CROPS_TOP_LEFT = (0, 0)


@dataclass(frozen=True)
class Conditioning:
    """What the job's UNet rows take besides the latents; fixed for the job's life.

    Every tensor has one entry per row, in row order.
    """

    encoder_hidden_states: torch.Tensor
    #: SDXL: pooled text embeddings and the size/crop time ids.
    text_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    #: UNets distilled with a guidance embedding (``time_cond_proj_dim``).
    timestep_cond: torch.Tensor | None = None
    #: 9-channel inpainting UNets: mask and masked-image latents, appended as channels.
    mask: torch.Tensor | None = None
    masked_image_latents: torch.Tensor | None = None


@dataclass(frozen=True)
class Blend:
    """Inpainting with a 4-channel UNet: after each step the known region is put back,
    as the init image's latents noised to the next timestep (as the pipelines do)."""

    image_latents: torch.Tensor
    noise: torch.Tensor
    #: ``[k, 1, h, w]``: 1 where the image is repainted.
    mask: torch.Tensor


@dataclass(frozen=True)
class PreparedControl:
    """One of the job's controls, ready for the ControlNet: the pipelines' ``prepare_image``.

    ``image`` is 0..1 float NCHW at the job size, one row per UNet row (the same image
    for a guided job's unconditional and conditional rows, as the pipelines do).
    """

    name: str
    image: torch.Tensor
    scale: float
    start: float
    end: float

    def weight(self, step: int, steps: int) -> float:
        """The factor of the ControlNet's residuals at ``step`` of ``steps``: the scale
        inside the start/end window, 0 outside (the pipelines' ``controlnet_keep``)."""
        keep = 1.0 - float(step / steps < self.start or (step + 1) / steps > self.end)
        return self.scale * keep


@dataclass(eq=False)
class PreparedJob:
    """A job inside the engine: its state between steps. Engine thread only."""

    request: GenerationRequest
    #: The family's pipeline for the job's mode (for its VAE, processors and helpers).
    pipeline: Any
    scheduler: Any
    timesteps: torch.Tensor
    latents: torch.Tensor
    guidance: bool
    conditioning: Conditioning
    extra_step_kwargs: dict[str, Any]
    generators: list[torch.Generator]
    blend: Blend | None = None
    #: Sorted by ControlNet name (stably), the order of its :class:`GroupKey`'s selection.
    controls: tuple[PreparedControl, ...] = ()
    warnings: list[str] = field(default_factory=list)
    #: Steps done so far; the next step uses ``timesteps[done]``.
    done: int = 0

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    @property
    def finished(self) -> bool:
        return self.done >= self.steps

    @property
    def rows(self) -> int:
        return self.latents.shape[0] * (2 if self.guidance else 1)


def job_rows(model: LoadedModel, request: GenerationRequest) -> int:
    """UNet rows ``request`` takes in every step: one per image, two with guidance."""
    return request.num_images * (2 if uses_guidance(model.pipeline, request.guidance_scale) else 1)


def generators_for(request: GenerationRequest) -> list[torch.Generator]:
    """CPU generators, one per image: the same noise on every device, image k from seed + k."""
    return [
        torch.Generator(device="cpu").manual_seed((request.seed + k) % SEED_SPACE)
        for k in range(request.num_images)
    ]


def diffusers_arguments(request: GenerationRequest) -> dict[str, Any]:
    """The keyword arguments of the diffusers pipeline call that ``request`` equals.

    A job that runs alone gives the bytes of ``model.pipeline_for(mode)(**these)`` with a
    fresh ``model.make_scheduler(request.scheduler)`` on the pipeline (what the tests and
    benchmarks compare against); the inpaint pipelines' output is then composited onto
    the init image as :func:`latentcast.server.images.composite` does.
    """
    arguments: dict[str, Any] = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "num_inference_steps": request.schedule_steps,
        "guidance_scale": request.guidance_scale,
        "num_images_per_prompt": request.num_images,
        "generator": generators_for(request),
        "output_type": "pil",
    }
    if request.mode == "txt2img":
        arguments.update(width=request.width, height=request.height)
    else:
        # The images were scaled to the job size when the job was accepted.
        arguments.update(image=request.init_image, strength=request.strength)
    if request.mode == "inpaint":
        arguments.update(mask_image=request.mask, width=request.width, height=request.height)
    return arguments


def prepare(model: LoadedModel, prompts: PromptCache, request: GenerationRequest) -> PreparedJob:
    """Make ``request`` ready to step: the pipelines' phases 1-9, our own way of holding them.

    Activates the job's LoRAs (they change the text embeddings). Raises what diffusers
    raises for inputs it cannot take.
    """
    pipeline: Any = model.pipeline_for(request.mode)
    model.activate_loras(request.loras)
    scheduler = model.make_scheduler(request.scheduler)
    # The pipelines' helpers (get_timesteps, prepare_latents, prepare_extra_step_kwargs)
    # read self.scheduler: the job's own, for as long as it is prepared.
    pipeline.scheduler = scheduler
    device = pipeline._execution_device
    sdxl = model.family.name == "sdxl"
    k = request.num_images
    guidance = uses_guidance(pipeline, request.guidance_scale)
    generators = generators_for(request)

    with torch.no_grad():
        # Encode the prompt (cached), repeated for k images, [uncond, cond] with guidance.
        embeddings = _repeat_embeddings(
            pipeline, prompts.embeddings(model, pipeline, request), k, guidance, device
        )
        prompt_embeds = embeddings["prompt_embeds"]
        dtype = prompt_embeds.dtype
        if guidance:
            prompt_embeds = torch.cat([embeddings["negative_prompt_embeds"], prompt_embeds])

        # Timesteps (img2img and inpaint start part-way, by strength).
        scheduler.set_timesteps(request.schedule_steps, device=device)
        timesteps = scheduler.timesteps
        if request.mode == "txt2img":
            if sdxl and hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(0)
        else:
            timesteps, _ = pipeline.get_timesteps(request.schedule_steps, request.strength, device)

        # Latents (and for inpaint the mask and what the blend needs).
        blend = None
        mask = masked_image_latents = None
        if request.mode == "txt2img":
            latents = pipeline.prepare_latents(
                k,
                pipeline.unet.config.in_channels,
                request.height,
                request.width,
                dtype,
                device,
                generators,
                None,
            )
        elif request.mode == "img2img":
            image = pipeline.image_processor.preprocess(request.init_image)
            latent_timestep = timesteps[:1].repeat(k)
            latents = pipeline.prepare_latents(
                image, latent_timestep, 1, k, dtype, device, generators
            )
        else:
            latents, blend, mask, masked_image_latents = _prepare_inpaint(
                pipeline, request, timesteps, dtype, device, generators, guidance, sdxl
            )

        extra_step_kwargs = pipeline.prepare_extra_step_kwargs(generators, 0.0)

        timestep_cond = None
        if pipeline.unet.config.time_cond_proj_dim is not None:
            scale = torch.tensor(request.guidance_scale - 1).repeat(k)
            timestep_cond = pipeline.get_guidance_scale_embedding(
                scale, embedding_dim=pipeline.unet.config.time_cond_proj_dim
            ).to(device=device, dtype=latents.dtype)

        text_embeds = time_ids = None
        if sdxl:
            text_embeds, time_ids = _sdxl_added_conditioning(
                pipeline, request, embeddings, latents, k, guidance, dtype, device
            )

        controls = tuple(
            _prepare_control(model, pipeline, control, request, guidance, device)
            for control in sorted(request.controls, key=lambda control: control.name)
        )

    return PreparedJob(
        request=request,
        pipeline=pipeline,
        scheduler=scheduler,
        timesteps=timesteps,
        latents=latents,
        guidance=guidance,
        conditioning=Conditioning(
            encoder_hidden_states=prompt_embeds.to(device),
            text_embeds=text_embeds,
            time_ids=time_ids,
            # Only UNets without guidance rows have one (uses_guidance): one per image.
            timestep_cond=timestep_cond,
            mask=mask if pipeline.unet.config.in_channels == 9 else None,
            masked_image_latents=(
                masked_image_latents if pipeline.unet.config.in_channels == 9 else None
            ),
        ),
        extra_step_kwargs=extra_step_kwargs,
        generators=generators,
        blend=blend,
        controls=controls,
        warnings=prompt_warnings(pipeline, request),
    )


def _prepare_control(
    model: LoadedModel,
    pipeline: Any,
    control: JobControl,
    request: GenerationRequest,
    guidance: bool,
    device: torch.device,
) -> PreparedControl:
    """The ControlNet pipelines' ``prepare_image`` for one control (guess mode off)."""
    from diffusers.image_processor import VaeImageProcessor

    controlnet = model.controlnet(control.name)
    processor = VaeImageProcessor(
        vae_scale_factor=pipeline.vae_scale_factor, do_convert_rgb=True, do_normalize=False
    )
    image = processor.preprocess(control.image, height=request.height, width=request.width)
    image = image.to(dtype=torch.float32).repeat_interleave(request.num_images, dim=0)
    image = image.to(device=device, dtype=controlnet.dtype)
    if guidance:
        image = torch.cat([image] * 2)
    return PreparedControl(
        name=control.name,
        image=image,
        scale=control.scale,
        start=control.start,
        end=control.end,
    )


def _repeat_embeddings(
    pipeline: Any,
    cached: dict[str, torch.Tensor | None],
    k: int,
    guidance: bool,
    device: torch.device,
) -> dict[str, Any]:
    """The cached one-image embeddings as ``encode_prompt`` returns them for ``k`` images."""
    encoded = pipeline.encode_prompt(
        prompt=None,
        device=device,
        num_images_per_prompt=k,
        do_classifier_free_guidance=guidance,
        **{name: value for name, value in cached.items() if value is not None},
        lora_scale=None,
    )
    names = ["prompt_embeds", "negative_prompt_embeds"]
    if len(encoded) == 4:
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return dict(zip(names, encoded, strict=True))


def _prepare_inpaint(
    pipeline: Any,
    request: GenerationRequest,
    timesteps: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    generators: list[torch.Generator],
    guidance: bool,
    sdxl: bool,
) -> tuple[torch.Tensor, Blend | None, torch.Tensor, torch.Tensor]:
    """Inpaint phases 5-7 of the pipelines: latents, noise, mask and masked image."""
    k = request.num_images
    height, width = request.height, request.width
    latent_timestep = timesteps[:1].repeat(k)
    init_image = pipeline.image_processor.preprocess(
        request.init_image, height=height, width=width, crops_coords=None, resize_mode="default"
    ).to(dtype=torch.float32)
    unet_channels = pipeline.unet.config.in_channels
    extra = {"add_noise": True} if sdxl else {}
    outputs = pipeline.prepare_latents(
        k,
        pipeline.vae.config.latent_channels,
        height,
        width,
        dtype,
        device,
        generators,
        None,
        image=init_image,
        timestep=latent_timestep,
        is_strength_max=request.strength == 1.0,
        return_noise=True,
        return_image_latents=unet_channels == 4,
        **extra,
    )
    mask_condition = pipeline.mask_processor.preprocess(
        request.mask, height=height, width=width, resize_mode="default", crops_coords=None
    )
    masked_image = init_image * (mask_condition < 0.5)
    mask, masked_image_latents = pipeline.prepare_mask_latents(
        mask_condition, masked_image, k, height, width, dtype, device, generators, guidance
    )
    if unet_channels == 4:
        latents, noise, image_latents = outputs
        init_mask = mask.chunk(2)[0] if guidance else mask
        return latents, Blend(image_latents, noise, init_mask), mask, masked_image_latents
    latents, _noise = outputs
    return latents, None, mask, masked_image_latents


def _sdxl_added_conditioning(
    pipeline: Any,
    request: GenerationRequest,
    embeddings: dict[str, Any],
    latents: torch.Tensor,
    k: int,
    guidance: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's pooled text embeddings and time ids for every row (pipelines' phase 7)."""
    pooled = embeddings["pooled_prompt_embeds"]
    if pipeline.text_encoder_2 is None:
        projection_dim = int(pooled.shape[-1])
    else:
        projection_dim = pipeline.text_encoder_2.config.projection_dim
    if request.mode == "txt2img":
        size = (request.height, request.width)
        time_ids = pipeline._get_add_time_ids(
            size, _CROPS_TOP_LEFT, size, dtype=dtype, text_encoder_projection_dim=projection_dim
        )
        if guidance:
            time_ids = torch.cat([time_ids, time_ids], dim=0)
        time_ids = time_ids.repeat(k, 1)
    else:
        scale = pipeline.vae_scale_factor
        size = (latents.shape[-2] * scale, latents.shape[-1] * scale)
        time_ids, negative_time_ids = pipeline._get_add_time_ids(
            size,
            _CROPS_TOP_LEFT,
            size,
            _AESTHETIC_SCORE,
            _NEGATIVE_AESTHETIC_SCORE,
            size,
            _CROPS_TOP_LEFT,
            size,
            dtype=dtype,
            text_encoder_projection_dim=projection_dim,
        )
        time_ids = time_ids.repeat(k, 1)
        if guidance:
            time_ids = torch.cat([negative_time_ids.repeat(k, 1), time_ids], dim=0)
    text_embeds = pooled
    if guidance:
        text_embeds = torch.cat([embeddings["negative_pooled_prompt_embeds"], pooled], dim=0)
    return text_embeds.to(device), time_ids.to(device)
