"""What the front end needs to know about an engine's model, as plain data.

An engine loads its model wherever it runs (this process, a Ray actor on another
machine); the sessions, the scheduler and the engine loop on the event loop only need
these facts: what to tell clients in ``welcome``, how to validate a submit, and how many
UNet rows a job takes in which group. :meth:`ModelFacts.of` reads them on the engine's
side (building the schedulers runs torch); the result pickles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..jobs import GenerationRequest
from ..models import LatentRGB, LoadedModel
from .batching import GroupKey, guided


@dataclass(frozen=True)
class ModelFacts:
    """A loaded model as the front end sees it. Immutable; safe on any thread."""

    name: str
    family: str
    #: ``str(torch.device)`` and the dtype's name ("float32"), for logs.
    device: str
    dtype: str
    modes: tuple[str, ...]
    schedulers: tuple[str, ...]
    default_scheduler: str
    loras: tuple[str, ...]
    latent_channels: int
    vae_scale_factor: int
    default_size: int
    latent_rgb: LatentRGB | None
    #: A TAESD preview decoder is loaded: image previews work even without latent_rgb.
    preview_decoder: bool
    #: The UNet takes the guidance scale as an input (LCM-distilled): never two rows.
    guidance_embedded: bool
    #: The most steps a scheduler accepts, for those with a limit (lcm: 50).
    step_limits: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    #: Names of the ControlNets loaded with the model (feature "controls").
    controlnets: tuple[str, ...] = ()

    @classmethod
    def of(cls, model: LoadedModel) -> ModelFacts:
        """Read the facts of ``model``: on the engine's thread (it builds schedulers)."""
        return cls(
            name=model.name,
            family=model.family.name,
            device=str(model.device),
            dtype=str(model.dtype).removeprefix("torch."),
            modes=tuple(model.modes),
            schedulers=tuple(model.schedulers),
            default_scheduler=model.default_scheduler,
            loras=tuple(model.loras),
            latent_channels=model.latent_channels,
            vae_scale_factor=model.vae_scale_factor,
            default_size=model.default_size,
            latent_rgb=model.family.latent_rgb,
            preview_decoder=model.preview_decoder is not None,
            guidance_embedded=model.pipeline.unet.config.time_cond_proj_dim is not None,
            step_limits=MappingProxyType(model.scheduler_step_limits()),
            controlnets=tuple(model.controlnets),
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # MappingProxyType does not pickle: rebuild from a plain dict.
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values["step_limits"] = dict(self.step_limits)
        return (_rebuild, (values,))

    @property
    def image_previews(self) -> bool:
        """Whether image previews can be made (PROTOCOL.md section 3)."""
        return self.latent_rgb is not None or self.preview_decoder

    def uses_guidance(self, guidance_scale: float) -> bool:
        """The pipelines' ``do_classifier_free_guidance`` rule for ``guidance_scale``."""
        return guided(guidance_scale, embedded=self.guidance_embedded)

    def job_rows(self, request: GenerationRequest) -> int:
        """UNet rows ``request`` takes in every step: one per image, two with guidance."""
        return request.num_images * (2 if self.uses_guidance(request.guidance_scale) else 1)

    def group_key(self, spec_or_request: Any) -> GroupKey:
        """The :class:`GroupKey` of a request or job spec: which jobs share UNet calls."""
        return group_key(self, spec_or_request)


def group_key(model: LoadedModel | ModelFacts, spec_or_request: Any) -> GroupKey:
    """The :class:`GroupKey` of a request or job spec on ``model`` (fixed facts only)."""
    request = getattr(spec_or_request, "request", spec_or_request)
    scale = model.vae_scale_factor
    return GroupKey(
        latent_height=request.height // scale,
        latent_width=request.width // scale,
        loras=tuple((str(name), float(value)) for name, value in request.loras),
        controlnets=tuple(sorted(control.name for control in request.controls)),
    )


def _rebuild(values: dict[str, Any]) -> ModelFacts:
    values["step_limits"] = MappingProxyType(values["step_limits"])
    return ModelFacts(**values)
