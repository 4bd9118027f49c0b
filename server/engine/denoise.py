"""Phases 2-3 of a step: one UNet call for a group of jobs, then each job's own step.

:func:`predict_noise` concatenates every job's rows (latents scaled by the job's own
scheduler, per-row timesteps, text embeddings, SDXL's added conditioning, a 9-channel
UNet's mask channels) into one UNet call and gives each job its slice of the output.
:func:`advance` then does, per job, what the pipelines do after their UNet call:
classifier-free guidance with the job's scale, the job's scheduler step (with its own
generators), and the inpainting blend.

A group of one job calls the UNet exactly as the diffusers pipeline does (the same
tensors, the scalar timestep), so a job that runs alone gives the pipeline's bytes.

ControlNets: a group shares one ControlNet selection (its :class:`GroupKey`), and each
ControlNet of it is called once for all the group's rows, before the UNet, with the
UNet's inputs (the 4-channel scaled latents, for a 9-channel inpainting UNet too) and
each row's own control image. Its residuals are weighted per row by the row's job
(scale inside the job's start/end window, 0 outside), summed over the ControlNets in
selection order (as ``MultiControlNetModel`` does) and added inside the UNet
(``down_block_additional_residuals``, ``mid_block_additional_residual``). When every
row has the same weight the ControlNet applies it itself (``conditioning_scale``),
which is what a ControlNet pipeline does for a job alone; when every weight is 0 the
ControlNet is not called at all (adding zeros changes nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .prepare import PreparedJob


def predict_noise(
    unet: Any, jobs: Sequence[PreparedJob], controlnets: Sequence[Any] = ()
) -> list[torch.Tensor]:
    """One UNet call for ``jobs``' next step; each job's noise prediction, in order.

    ``controlnets`` are the modules of the group's ControlNet selection, in its order:
    every job has one control per entry (its controls sorted by name).

    Leaves the jobs as they were (scaling the input reads the scheduler, it does not
    advance it), so a failed call can be made again with fewer jobs.
    """
    scaled = []
    samples = []
    for job in jobs:
        t = job.timesteps[job.done]
        sample = torch.cat([job.latents] * 2) if job.guidance else job.latents
        sample = job.scheduler.scale_model_input(sample, t)
        scaled.append(sample)
        cond = job.conditioning
        if cond.mask is not None and cond.masked_image_latents is not None:
            sample = torch.cat([sample, cond.mask, cond.masked_image_latents], dim=1)
        samples.append(sample)

    if len(jobs) == 1:
        (job,) = jobs
        cond = job.conditioning
        timestep: torch.Tensor = job.timesteps[job.done]
        sample = samples[0]
        control_sample = scaled[0]
        hidden = cond.encoder_hidden_states
        timestep_cond = cond.timestep_cond
        added = _added(cond.text_embeds, cond.time_ids)
    else:
        sample = torch.cat(samples)
        control_sample = torch.cat(scaled) if controlnets else sample
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
        down, mid = _control_residuals(controlnets, jobs, control_sample, timestep, hidden, added)
        prediction = unet(
            sample,
            timestep,
            encoder_hidden_states=hidden,
            timestep_cond=timestep_cond,
            cross_attention_kwargs=None,
            added_cond_kwargs=added,
            down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
            return_dict=False,
        )[0]
    parts = []
    start = 0
    for part in samples:
        parts.append(prediction[start : start + part.shape[0]])
        start += part.shape[0]
    return parts


def _control_residuals(
    controlnets: Sequence[Any],
    jobs: Sequence[PreparedJob],
    sample: torch.Tensor,
    timestep: torch.Tensor,
    hidden: torch.Tensor,
    added: Any,
) -> tuple[list[torch.Tensor] | None, torch.Tensor | None]:
    """The summed, per-row weighted residuals of the group's ControlNets (None: none)."""
    down: list[torch.Tensor] | None = None
    mid: torch.Tensor | None = None
    for slot, controlnet in enumerate(controlnets):
        controls = [job.controls[slot] for job in jobs]
        weights = [
            control.weight(job.done, job.steps) for job, control in zip(jobs, controls, strict=True)
        ]
        if not any(weights):
            continue
        uniform = all(weight == weights[0] for weight in weights)
        images = [control.image for control in controls]
        control_down, control_mid = controlnet(
            sample,
            timestep,
            encoder_hidden_states=hidden,
            controlnet_cond=images[0] if len(images) == 1 else torch.cat(images),
            conditioning_scale=weights[0] if uniform else 1.0,
            guess_mode=False,
            added_cond_kwargs=added,
            return_dict=False,
        )
        if not uniform:
            per_row = [w for job, w in zip(jobs, weights, strict=True) for _ in range(job.rows)]
            rows = torch.tensor(
                per_row,
                dtype=control_mid.dtype,
                device=control_mid.device,
            ).reshape(-1, 1, 1, 1)
            control_down = [residual * rows for residual in control_down]
            control_mid = control_mid * rows
        if down is None or mid is None:
            down, mid = list(control_down), control_mid
        else:
            down = [total + part for total, part in zip(down, control_down, strict=True)]
            mid = mid + control_mid
    return down, mid


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
