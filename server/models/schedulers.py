"""The selectable schedulers: names, diffusers classes and config overrides."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class _SchedulerSpec:
    """A selectable scheduler: diffusers class, config overrides, extra package."""

    name: str
    class_name: str
    overrides: tuple[tuple[str, Any], ...] = ()
    #: A Python package the scheduler needs beyond diffusers (skipped when missing).
    requires: str | None = None


# Plain (non-Karras) sigma schedules, whatever the model's own scheduler used.
_PLAIN_SIGMAS: tuple[tuple[str, Any], ...] = (
    ("use_karras_sigmas", False),
    ("use_exponential_sigmas", False),
    ("use_beta_sigmas", False),
)
_KARRAS_SIGMAS: tuple[tuple[str, Any], ...] = (
    ("use_karras_sigmas", True),
    ("use_exponential_sigmas", False),
    ("use_beta_sigmas", False),
)
# Loop iterations per job (``len(scheduler.timesteps)`` after ``set_timesteps(n)``):
# n for all of these except heun (2n - 1: a second-order method, two model calls per
# step but the last) — the pipelines iterate over every timestep, so that is what
# progress counts. lcm refuses n > original_inference_steps (50 by default).
_SCHEDULER_SPECS: tuple[_SchedulerSpec, ...] = (
    _SchedulerSpec("euler", "EulerDiscreteScheduler", _PLAIN_SIGMAS),
    _SchedulerSpec("euler_a", "EulerAncestralDiscreteScheduler"),
    _SchedulerSpec("heun", "HeunDiscreteScheduler", _PLAIN_SIGMAS),
    # clip_sample clips x0 to [-1, 1]: right for pixel DDPMs, wrong for latents.
    _SchedulerSpec("ddim", "DDIMScheduler", (("clip_sample", False), ("set_alpha_to_one", False))),
    _SchedulerSpec(
        "dpmpp_2m",
        "DPMSolverMultistepScheduler",
        (("algorithm_type", "dpmsolver++"), ("solver_order", 2), *_PLAIN_SIGMAS),
    ),
    _SchedulerSpec(
        "dpmpp_2m_karras",
        "DPMSolverMultistepScheduler",
        (("algorithm_type", "dpmsolver++"), ("solver_order", 2), *_KARRAS_SIGMAS),
    ),
    _SchedulerSpec(
        "dpmpp_2m_sde",
        "DPMSolverMultistepScheduler",
        (("algorithm_type", "sde-dpmsolver++"), ("solver_order", 2), *_PLAIN_SIGMAS),
    ),
    _SchedulerSpec(
        "dpmpp_sde", "DPMSolverSDEScheduler", (("use_karras_sigmas", False),), requires="torchsde"
    ),
    _SchedulerSpec("unipc", "UniPCMultistepScheduler", _PLAIN_SIGMAS),
    _SchedulerSpec("lcm", "LCMScheduler", (("clip_sample", False),)),
)
_DEFAULT_SCHEDULER = "euler"


def available_schedulers() -> tuple[str, ...]:
    """Names of the schedulers usable here, the default (``"euler"``) first.

    Schedulers that need a package that is not installed (``dpmpp_sde`` needs
    ``torchsde``) are left out.
    """
    return tuple(spec.name for spec in _SCHEDULER_SPECS if _spec_available(spec))


def _spec_available(spec: _SchedulerSpec) -> bool:
    return spec.requires is None or importlib.util.find_spec(spec.requires) is not None


def _scheduler_spec(name: str) -> _SchedulerSpec | None:
    for spec in _SCHEDULER_SPECS:
        if spec.name == name:
            return spec
    return None
