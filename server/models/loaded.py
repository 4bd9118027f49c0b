"""LoadedModel: a loaded pipeline ready to generate, and what the server needs about it."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from .families import ModelFamily
from .loras import _LoraState
from .schedulers import _scheduler_spec

if TYPE_CHECKING:
    import numpy as np
    from diffusers import AutoencoderTiny, DiffusionPipeline
    from diffusers.schedulers.scheduling_utils import SchedulerMixin


@dataclass(frozen=True)
class LoadedModel:
    """A pipeline ready to generate, plus the facts the server needs about it.

    ``pipeline`` is the model's main pipeline: the text-to-image one, except for a
    dedicated inpainting model (``inpaint_unet``), where it is the inpainting
    pipeline. :meth:`pipeline_for` gives the pipeline of each mode in ``modes``; they
    were all built once at load time and share the same module objects (one copy of
    the weights, one set of LoRA layers).

    The pipelines' ``scheduler`` attribute is for the caller to replace per job
    (:meth:`make_scheduler`); nothing else about them should be changed. Every job's
    scheduler is built from :attr:`scheduler_config`, the loaded scheduler's config
    captured at load time, never from whatever scheduler a previous job left there.
    """

    name: str
    family: ModelFamily
    pipeline: DiffusionPipeline
    device: torch.device
    dtype: torch.dtype
    latent_channels: int
    vae_scale_factor: int
    schedulers: tuple[str, ...]
    default_scheduler: str
    #: Side length the model was trained at (UNet sample size x VAE scale factor).
    default_size: int
    #: What this model can do, a subset of :data:`MODES` in that order.
    modes: tuple[str, ...]
    #: True for a dedicated inpainting UNet (9 input channels): modes is ("inpaint",).
    inpaint_unet: bool
    #: The loaded scheduler's config (the model's training noise schedule), copied
    #: before any job ran and read-only: what :meth:`make_scheduler` builds from.
    scheduler_config: Mapping[str, Any]
    #: Names of the LoRA adapters loaded at start, sorted; all inactive until selected.
    loras: tuple[str, ...] = ()
    #: A tiny decoder (TAESD) for image previews, on the model's device and dtype.
    preview_decoder: AutoencoderTiny | None = None
    #: Names of the ControlNets loaded with the model (``--controlnet``), sorted.
    controlnets: tuple[str, ...] = ()
    _pipelines: Mapping[str, Any] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )
    _adapters: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )
    _lora_state: _LoraState = field(default_factory=_LoraState, repr=False, compare=False)
    _controlnets: Mapping[str, Any] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )

    def pipeline_for(self, mode: str) -> DiffusionPipeline:
        """The pipeline that runs ``mode`` (one of :attr:`modes`).

        txt2img: the loaded pipeline; img2img: ``StableDiffusion[XL]Img2ImgPipeline``;
        inpaint: ``StableDiffusion[XL]InpaintPipeline``. With a normal 4-channel UNet
        the inpainting pipelines (diffusers 0.42) blend at every step: after each
        scheduler step the known region is replaced by the init image's latents
        noised to the next timestep (``(1 - mask) * init + mask * latents``), and a
        9-channel inpainting UNet instead gets mask and masked image as inputs.

        Raises:
            ValueError: the model cannot do ``mode``.
        """
        pipeline = self._pipelines.get(mode)
        if pipeline is None:
            known = ", ".join(self.modes)
            raise ValueError(f"mode {mode!r} is not available with this model (modes: {known})")
        built: DiffusionPipeline = pipeline
        return built

    def controlnet(self, name: str) -> Any:
        """The loaded ``ControlNetModel`` called ``name`` (one of :attr:`controlnets`).

        Raises:
            ValueError: no ControlNet of that name was loaded.
        """
        module = self._controlnets.get(name)
        if module is None:
            known = ", ".join(self.controlnets) or "none loaded"
            raise ValueError(f"unknown ControlNet {name!r}; available: {known}")
        return module

    def scheduler_step_limits(self) -> dict[str, int]:
        """The most ``num_inference_steps`` each scheduler accepts, for those with a limit.

        lcm distils ``original_inference_steps`` (50) and refuses more. Builds every
        scheduler, which runs torch: call it on the engine thread.
        """
        limits = {}
        for name in self.schedulers:
            limit = self.make_scheduler(name).config.get("original_inference_steps")
            if limit:
                limits[name] = int(limit)
        return limits

    def make_scheduler(self, name: str) -> SchedulerMixin:
        """Return a fresh scheduler instance of kind ``name`` for one job.

        Schedulers are stateful (timesteps, step index), so every job needs its own.
        The instance is built from :attr:`scheduler_config` (the scheduler config the
        model was loaded with, whatever scheduler is on the pipelines now), which keeps
        the model's training noise schedule (betas, offsets, prediction type, timestep
        spacing), with the overrides that define ``name`` (e.g. Karras sigmas).

        Raises:
            ValueError: ``name`` is not one of :attr:`schedulers`.
        """
        import diffusers

        spec = _scheduler_spec(name) if name in self.schedulers else None
        if spec is None:
            known = ", ".join(self.schedulers)
            raise ValueError(f"unknown scheduler {name!r}; available: {known}")
        scheduler_cls = getattr(diffusers, spec.class_name)
        accepted = inspect.signature(scheduler_cls.__init__).parameters
        overrides = {key: value for key, value in spec.overrides if key in accepted}
        # A plain dict copy: from_config takes anything else for a path to load from.
        config = copy.deepcopy(dict(self.scheduler_config))
        scheduler: SchedulerMixin = scheduler_cls.from_config(config, **overrides)
        return scheduler

    def activate_loras(self, selection: Sequence[tuple[str, float]]) -> None:
        """Make exactly the adapters in ``selection`` active, with those scales.

        An empty selection disables every adapter, which gives exactly the images of
        the model without any LoRA loaded. Applies to all of :meth:`pipeline_for`'s
        pipelines (they share the modules) and lasts until the next call. Cheap when
        the selection is unchanged, so call it before every job.

        Raises:
            ValueError: an unknown or repeated name, or a non-finite scale.
        """
        wanted = tuple((str(name), float(scale)) for name, scale in selection)
        names = [name for name, _ in wanted]
        for name, scale in wanted:
            if name not in self._adapters:
                known = ", ".join(self.loras) or "none loaded"
                raise ValueError(f"unknown LoRA {name!r}; available: {known}")
            if not math.isfinite(scale):
                raise ValueError(f"LoRA {name!r} scale must be finite, got {scale}")
        if len(set(names)) != len(names):
            raise ValueError(f"a LoRA is selected twice in {names}")
        state = self._lora_state
        if wanted == state.active:
            return
        if not self._adapters:
            state.active = ()
            return
        pipeline: Any = self.pipeline
        state.active = None
        if wanted:
            pipeline.enable_lora()
            pipeline.set_adapters(
                [self._adapters[name] for name in names],
                adapter_weights=[scale for _, scale in wanted],
            )
        else:
            pipeline.disable_lora()
        state.active = wanted

    def decode_preview(self, latent: torch.Tensor) -> np.ndarray:
        """Decode a latent with the preview decoder into an RGB uint8 ``[H, W, 3]`` array.

        ``latent`` is ``[1, c, h, w]`` (or ``[c, h, w]``) as the sampler holds it:
        already multiplied by the main VAE's scaling factor. TAESD is trained on
        exactly those scaled latents: diffusers' ``AutoencoderTiny`` has
        ``scaling_factor`` 1.0, so a pipeline divides by 1.0 before decoding with it
        and so do we (plus its ``shift_factor``, 0.0 for TAESD) — dividing by the
        main VAE's 0.18215 here would be wrong.

        Raises:
            RuntimeError: no preview decoder was loaded.
        """
        import numpy as np

        decoder: Any = self.preview_decoder
        if decoder is None:
            raise RuntimeError("no preview decoder loaded (load_model(preview_decoder=...))")
        if latent.dim() == 3:
            latent = latent.unsqueeze(0)
        config = decoder.config
        with torch.inference_mode():
            sample = latent[:1].to(device=decoder.device, dtype=decoder.dtype)
            sample = sample / config.scaling_factor + config.get("shift_factor", 0.0)
            image = decoder.decode(sample).sample[0]
            image = ((image.float().clamp(-1.0, 1.0) + 1.0) * 127.5).round()
            array = image.to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        return np.ascontiguousarray(array)
