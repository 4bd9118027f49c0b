"""Phases 2-3 of a step: one UNet call for a group of jobs, then each job's own step.

:func:`predict_noise` concatenates every job's rows (latents scaled by the job's own
scheduler, per-row timesteps, text embeddings, SDXL's added conditioning, a 9-channel
UNet's mask channels) into one UNet call and gives each job its slice of the output.
:func:`advance` then does, per job, what the pipelines do after their UNet call:
classifier-free guidance with the job's scale, the job's scheduler step (with its own
generators), and the inpainting blend.

A group of one job calls the UNet exactly as the diffusers pipeline does (the same
tensors, the scalar timestep), so a job that runs alone gives the pipeline's bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .prepare import PreparedJob


def predict_noise(unet: Any, jobs: Sequence[PreparedJob]) -> list[torch.Tensor]:
    """One UNet call for ``jobs``' next step; each job's noise prediction, in order.

    Leaves the jobs as they were (scaling the input reads the scheduler, it does not
    advance it), so a failed call can be made again with fewer jobs.
    """
    samples = []
    for job in jobs:
        t = job.timesteps[job.done]
        sample = torch.cat([job.latents] * 2) if job.guidance else job.latents
        sample = job.scheduler.scale_model_input(sample, t)
        cond = job.conditioning
        if cond.mask is not None and cond.masked_image_latents is not None:
            sample = torch.cat([sample, cond.mask, cond.masked_image_latents], dim=1)
        samples.append(sample)

    if len(jobs) == 1:
        (job,) = jobs
        cond = job.conditioning
        timestep: torch.Tensor = job.timesteps[job.done]
        sample = samples[0]
        hidden = cond.encoder_hidden_states
        timestep_cond = cond.timestep_cond
        added = _added(cond.text_embeds, cond.time_ids)
    else:
        sample = torch.cat(samples)
        timestep = torch.cat(
            [
                job.timesteps[job.done].to(torch.float32).reshape(1).expand(part.shape[0])
                for job, part in zip(jobs, samples, strict=True)
            ]
        )
        hidden = torch.cat([job.conditioning.encoder_hidden_states for job in jobs])
        timestep_cond = _cat_optional([job.conditioning.timestep_cond for job in jobs])
        added = _added(
            _cat_optional([job.conditioning.text_embeds for job in jobs]),
            _cat_optional([job.conditioning.time_ids for job in jobs]),
        )
    with torch.no_grad():
        prediction = unet(
            sample,
            timestep,
            encoder_hidden_states=hidden,
            timestep_cond=timestep_cond,
            cross_attention_kwargs=None,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
    parts = []
    start = 0
    for part in samples:
        parts.append(prediction[start : start + part.shape[0]])
        start += part.shape[0]
    return parts


def advance(job: PreparedJob, noise_pred: torch.Tensor) -> None:
    """The job's guidance, scheduler step and inpainting blend for its current step."""
    i = job.done
    t = job.timesteps[i]
    with torch.no_grad():
        if job.guidance:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + job.request.guidance_scale * (text - uncond)
        latents = job.scheduler.step(
            noise_pred, t, job.latents, **job.extra_step_kwargs, return_dict=False
        )[0]
        blend = job.blend
        if blend is not None:
            known = blend.image_latents
            if i < len(job.timesteps) - 1:
                known = job.scheduler.add_noise(
                    known, blend.noise, torch.tensor([job.timesteps[i + 1]])
                )
            latents = (1 - blend.mask) * known + blend.mask * latents
    job.latents = latents
    job.done = i + 1


def _added(text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None) -> Any:
    if text_embeds is None or time_ids is None:
        return None
    return {"text_embeds": text_embeds, "time_ids": time_ids}


def _cat_optional(parts: list[torch.Tensor | None]) -> torch.Tensor | None:
    present = [part for part in parts if part is not None]
    if not present:
        return None
    if len(present) != len(parts):
        raise ValueError("jobs in one UNet call disagree on a conditioning input")
    return torch.cat(present)
