"""Model building and loading for the latentcast server.

This module turns a ``--model`` spec into a ready-to-run :class:`LoadedModel`:

* ``"tiny"``, ``"tiny-sdxl"``, ``"tiny-inpaint"``: tiny, randomly initialised but
  structurally real Stable Diffusion pipelines (real diffusers/transformers classes,
  VAE scale factor 8, four latent channels). Each is built in-process, saved once into
  the cache directory and then loaded through exactly the same ``from_pretrained``
  path as a real diffusers folder. They need no network and run fast on a CPU, which
  makes them the models for tests, CI and demos. ``tiny`` is SD 1.x, ``tiny-sdxl`` is
  SDXL (two text encoders, micro-conditioning), ``tiny-inpaint`` is SD 1.x with a
  9-channel inpainting UNet.
* a local diffusers folder (``from_pretrained``, local files only);
* a local ``.safetensors`` / ``.ckpt`` single-file checkpoint (original LDM/ComfyUI
  key layout), fully offline when a diffusers config folder is given
  (``model_config``);
* anything else is treated as a Hugging Face Hub model id.

On top of the loaded pipeline it provides: the architecture family (detected from
the pipeline itself), per-mode pipelines that share one copy of the weights,
schedulers by name, LoRA adapters chosen per job and an optional tiny preview
decoder (TAESD).

Heavy imports (diffusers, transformers) are done lazily inside the functions that
need them, so importing this module (for example for :class:`LatentRGB`) is cheap.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import json
import logging
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import numpy as np
    from diffusers import AutoencoderTiny, DiffusionPipeline
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import CLIPTokenizer

__all__ = [
    "IMG2IMG",
    "INPAINT",
    "MODES",
    "SD1_FAMILY",
    "SD2_FAMILY",
    "SDXL_FAMILY",
    "TINY_INPAINT_MODEL_NAME",
    "TINY_MODEL_NAME",
    "TINY_MODEL_NAMES",
    "TINY_MODEL_VERSION",
    "TINY_SDXL_MODEL_NAME",
    "TXT2IMG",
    "LatentRGB",
    "LoadedModel",
    "ModelFamily",
    "ModelLoadError",
    "available_schedulers",
    "build_tiny_inpaint_pipeline",
    "build_tiny_pipeline",
    "build_tiny_sdxl_pipeline",
    "default_cache_dir",
    "default_dtype",
    "detect_family",
    "load_model",
    "resolve_device",
    "tiny_model_dir",
]

TINY_MODEL_NAME = "tiny"
TINY_SDXL_MODEL_NAME = "tiny-sdxl"
TINY_INPAINT_MODEL_NAME = "tiny-inpaint"
#: Every built-in tiny model name (valid ``--model`` and ``--model-config`` values).
TINY_MODEL_NAMES = (TINY_MODEL_NAME, TINY_SDXL_MODEL_NAME, TINY_INPAINT_MODEL_NAME)
# Bump whenever a tiny builder changes: the cache folder name includes it, so a
# changed builder never reuses weights saved by an older one.
TINY_MODEL_VERSION = "v1"

#: Generation modes (the protocol's ``model.modes`` values).
TXT2IMG = "txt2img"
IMG2IMG = "img2img"
INPAINT = "inpaint"
MODES = (TXT2IMG, IMG2IMG, INPAINT)

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_DTYPES: tuple[tuple[str, torch.dtype], ...] = (
    ("float16", torch.float16),
    ("bfloat16", torch.bfloat16),
    ("float32", torch.float32),
)

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


class ModelLoadError(Exception):
    """A model spec (or a LoRA / preview decoder given with it) could not be loaded."""


# ----------------------------------------------------------------------------- families


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


# --------------------------------------------------------------------------- schedulers


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


# ------------------------------------------------------------------------------- LoRAs


class _LoraState:
    """The adapter selection currently applied to the model's modules.

    Mutable on purpose (the modules it describes are mutable): lets
    :meth:`LoadedModel.activate_loras` skip the module walk when a job selects what
    is already active. ``None`` means unknown (an activation failed half way).
    """

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active: tuple[tuple[str, float], ...] | None = ()


# ------------------------------------------------------------------------- LoadedModel


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
    _pipelines: Mapping[str, Any] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )
    _adapters: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), repr=False, compare=False
    )
    _lora_state: _LoraState = field(default_factory=_LoraState, repr=False, compare=False)

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

    def scheduler_step_limit(self, name: str) -> int | None:
        """Most ``num_inference_steps`` scheduler ``name`` accepts, if it has a limit.

        lcm distils ``original_inference_steps`` (50) and refuses more.
        """
        limit = self.make_scheduler(name).config.get("original_inference_steps")
        return int(limit) if limit else None

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


# ------------------------------------------------------------------------------ devices


def resolve_device(spec: str) -> torch.device:
    """Turn a device spec into an available :class:`torch.device`.

    ``"auto"`` picks cuda, then mps, then cpu. Explicit specs ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` and ``"mps"`` are checked for availability.

    Raises:
        ValueError: the spec is malformed, of an unsupported type, or not available
            on this machine.
    """
    text = spec.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(
            f"invalid device {spec!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from exc
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {spec!r} requested but CUDA is not available "
                "(no NVIDIA GPU, or this torch build has no CUDA support); use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {spec!r} requested but only {count} CUDA device(s) exist "
                f"(valid: cuda:0..cuda:{count - 1})"
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise ValueError(
                f"device {spec!r} requested but Apple MPS is not available; use --device cpu"
            )
        return device
    raise ValueError(
        f"unsupported device type {device.type!r} in {spec!r}: "
        "use 'auto', 'cpu', 'cuda[:N]' or 'mps'"
    )


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on cuda and mps, float32 elsewhere (cpu half precision is slow)."""
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.float32


def _parse_dtype(name: str) -> torch.dtype:
    for key, value in _DTYPES:
        if name == key:
            return value
    known = ", ".join(key for key, _ in _DTYPES)
    raise ValueError(f"unknown dtype {name!r}; expected one of: {known}")


# --------------------------------------------------------------------------- tiny models


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode char table (256 entries)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {byte: chr(code) for byte, code in zip(printable, codes, strict=True)}


# Words that get whole-word merges in the tiny vocabulary, so that the tokenizer
# exercises real BPE merges (and common prompts are a little shorter).
_TINY_MERGE_WORDS = ("a", "an", "the", "of", "and", "in", "photo", "cat", "dog", "painting")


def build_tiny_tokenizer() -> CLIPTokenizer:
    """A local byte-level BPE CLIP tokenizer: base alphabet + a few merges.

    Built from in-memory ``vocab``/``merges`` (transformers 5 builds a useless
    2-token vocab from ``vocab_file``/``merges_file`` arguments).
    """
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for char in alphabet:
        vocab[char] = len(vocab)
    for char in alphabet:
        vocab[char + "</w>"] = len(vocab)
    merges: list[tuple[str, str]] = []
    for word in _TINY_MERGE_WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merged = current + piece
            if merged not in vocab:
                merges.append((current, piece))
                vocab[merged] = len(vocab)
            current = merged
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    # The tokenizers BPE backend needs (left, right) tuples, although CLIPTokenizer's
    # annotation says list[str] ("left right" strings are rejected at runtime).
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)  # type: ignore[arg-type]


def _tiny_text_config(tokenizer: CLIPTokenizer, hidden_size: int, projection_dim: int) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _tiny_vae(scaling_factor: float) -> Any:
    """The tiny 4-block VAE (scale factor 8, 4 latent channels). Caller seeds the RNG."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=8,
        scaling_factor=scaling_factor,
    )


def _sd_scheduler() -> Any:
    """Euler with SD 1.x/SDXL's training schedule (what their model repos ship)."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def _build_tiny_sd1(unet_in_channels: int) -> dict[str, Any]:
    """Components of the tiny SD 1.x pipeline (deterministic, RNG forked)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=unet_in_channels,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=32,
        )
        torch.manual_seed(1)
        vae = _tiny_vae(scaling_factor=0.18215)
        torch.manual_seed(2)
        text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, 32, 32))
    modules: tuple[Any, ...] = (unet, vae, text_encoder)
    for module in modules:
        module.eval()
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": _sd_scheduler(),
        **_SAFETY_CHECKER_KWARGS,
    }


def build_tiny_pipeline() -> DiffusionPipeline:
    """Build the tiny SD 1.x pipeline in-process (random init, no download).

    Deterministic: every component is initialised under a fixed seed inside a
    forked RNG, so two builds give identical weights and the caller's global torch
    RNG state is left untouched. VAE has 4 blocks (scale factor 8), latents have 4
    channels, the scheduler is Euler with SD's training schedule. Returns a
    ``StableDiffusionPipeline``.
    """
    from diffusers import StableDiffusionPipeline

    pipeline: Any = StableDiffusionPipeline(**_build_tiny_sd1(unet_in_channels=4))
    pipeline.set_progress_bar_config(disable=True)
    built: DiffusionPipeline = pipeline
    return built


def build_tiny_inpaint_pipeline() -> DiffusionPipeline:
    """Build the tiny SD 1.x *inpainting* pipeline: :func:`build_tiny_pipeline` with a
    9-channel UNet (4 latent + 1 mask + 4 masked-image channels), as a
    ``StableDiffusionInpaintPipeline``. Deterministic like the others."""
    from diffusers import StableDiffusionInpaintPipeline

    pipeline: Any = StableDiffusionInpaintPipeline(
        **_build_tiny_sd1(unet_in_channels=_INPAINT_UNET_CHANNELS)
    )
    pipeline.set_progress_bar_config(disable=True)
    built: DiffusionPipeline = pipeline
    return built


# Tiny SDXL sizes. The UNet's cross-attention reads both text encoders' penultimate
# hidden states concatenated (32 + 48), and its "text_time" added embedding reads the
# pooled, projected output of the second encoder (32) plus six micro-conditioning
# numbers (original size, crop offset, target size) each embedded to 8 channels.
_TINY_SDXL_TEXT_HIDDEN = (32, 48)
_TINY_SDXL_PROJECTION_DIM = 32
_TINY_SDXL_TIME_EMBED_DIM = 8


def build_tiny_sdxl_pipeline() -> DiffusionPipeline:
    """Build the tiny SDXL pipeline in-process (random init, no download).

    Structurally SDXL: ``CLIPTextModel`` + ``CLIPTextModelWithProjection`` with two
    local tokenizers, a UNet with ``addition_embed_type="text_time"`` whose
    ``cross_attention_dim`` is the sum of both encoders' hidden sizes, the 4-block VAE
    (scale factor 8, SDXL's scaling factor 0.13025) and Euler with SDXL's schedule.
    Deterministic, the caller's RNG untouched. Returns a ``StableDiffusionXLPipeline``.
    """
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = build_tiny_tokenizer()
    tokenizer_2 = build_tiny_tokenizer()
    hidden_1, hidden_2 = _TINY_SDXL_TEXT_HIDDEN
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(10)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            cross_attention_dim=hidden_1 + hidden_2,
            addition_embed_type="text_time",
            addition_time_embed_dim=_TINY_SDXL_TIME_EMBED_DIM,
            projection_class_embeddings_input_dim=6 * _TINY_SDXL_TIME_EMBED_DIM
            + _TINY_SDXL_PROJECTION_DIM,
            norm_num_groups=32,
        )
        torch.manual_seed(11)
        vae = _tiny_vae(scaling_factor=0.13025)
        torch.manual_seed(12)
        text_encoder = CLIPTextModel(
            _tiny_text_config(tokenizer, hidden_1, _TINY_SDXL_PROJECTION_DIM)
        )
        torch.manual_seed(13)
        text_encoder_2 = CLIPTextModelWithProjection(
            _tiny_text_config(tokenizer_2, hidden_2, _TINY_SDXL_PROJECTION_DIM)
        )
    modules: tuple[Any, ...] = (unet, vae, text_encoder, text_encoder_2)
    for module in modules:
        module.eval()
    pipeline: Any = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=_sd_scheduler(),
        add_watermarker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    built: DiffusionPipeline = pipeline
    return built


def _tiny_builder(name: str) -> Callable[[], DiffusionPipeline]:
    # Looked up at call time (module globals), so tests can monkeypatch a builder.
    if name == TINY_MODEL_NAME:
        return build_tiny_pipeline
    if name == TINY_SDXL_MODEL_NAME:
        return build_tiny_sdxl_pipeline
    if name == TINY_INPAINT_MODEL_NAME:
        return build_tiny_inpaint_pipeline
    raise ValueError(f"unknown tiny model {name!r}; expected one of: {', '.join(TINY_MODEL_NAMES)}")


def default_cache_dir() -> Path:
    """The tiny models' cache root.

    ``$LATENTCAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/latentcast``, else ``~/.cache/latentcast``.
    """
    explicit = os.environ.get("LATENTCAST_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "latentcast"
    return Path.home() / ".cache" / "latentcast"


def tiny_model_dir(cache_dir: Path, name: str = TINY_MODEL_NAME) -> Path:
    """Return the folder holding the saved tiny model ``name``, building it if missing.

    ``name`` is one of :data:`TINY_MODEL_NAMES`; the folder is
    ``cache_dir / "<name>-<version>"``. Creation is atomic: the pipeline is saved into
    a temporary sibling folder which is then renamed into place with
    :func:`os.replace`, so a crash or a concurrent process never leaves (or sees) a
    half-written model. If another process wins the race, its folder is kept and ours
    is discarded.

    Raises:
        ValueError: ``name`` is not a tiny model.
    """
    build = _tiny_builder(name)
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{name}-{TINY_MODEL_VERSION}"
    if _is_complete_pipeline_dir(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
    try:
        pipeline: Any = build()
        pipeline.save_pretrained(staging, safe_serialization=True)
        try:
            os.replace(staging, target)
        except OSError:
            # Lost a race against another builder (target now exists, non-empty).
            if not _is_complete_pipeline_dir(target):
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _is_complete_pipeline_dir(path: Path) -> bool:
    return (path / "model_index.json").is_file()


# ------------------------------------------------------------------------------ loading


def load_model(
    spec: str,
    *,
    device: str = "auto",
    dtype: str | None = None,
    cache_dir: Path | None = None,
    model_config: str | Path | None = None,
    loras: Mapping[str, Path] = MappingProxyType({}),
    preview_decoder: Path | None = None,
) -> LoadedModel:
    """Load a Stable Diffusion 1.x / 2.x / SDXL model from ``spec``.

    ``spec`` may be:

    * ``"tiny"``, ``"tiny-sdxl"``, ``"tiny-inpaint"``: a built-in tiny model (built
      into ``cache_dir`` on first use, then loaded like any diffusers folder);
    * an existing diffusers folder: ``from_pretrained(folder, local_files_only=True)``
      with the pipeline class its ``model_index.json`` names;
    * an existing ``.safetensors`` / ``.ckpt`` file in the original (LDM, ComfyUI,
      A1111) layout: ``from_single_file``. ``model_config`` names the diffusers folder
      (or a tiny model name) whose configs, tokenizers and scheduler describe the
      checkpoint; with it, loading never reaches a hub. Without it diffusers fetches
      the matching config from the Hub, which is refused while ``HF_HUB_OFFLINE`` is
      set. ``model_config`` is ignored for every other kind of spec;
    * otherwise a Hugging Face Hub model id (honours ``HF_HUB_OFFLINE`` /
      ``TRANSFORMERS_OFFLINE`` read at call time: offline means the local HF cache only).

    ``dtype`` is ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``None`` for
    :func:`default_dtype` of the device. The pipeline is moved to the device, its
    progress bar disabled and its safety checker removed; the pipelines of the other
    modes are derived from it with ``from_pipe`` (shared weights).

    ``loras`` maps adapter names to LoRA files or folders (diffusers/kohya formats,
    anything ``load_lora_weights`` reads); they are loaded and left inactive
    (:meth:`LoadedModel.activate_loras`). ``preview_decoder`` is a local
    ``AutoencoderTiny`` (TAESD) folder whose latent channels match the model's.

    Raises:
        ValueError: bad ``device`` or ``dtype`` string, or device unavailable.
        ModelLoadError: the model, a LoRA or the preview decoder could not be loaded.
    """
    with _without_torchvision_notice():
        return _load_model(
            spec,
            device=device,
            dtype=dtype,
            cache_dir=cache_dir,
            model_config=model_config,
            loras=loras,
            preview_decoder=preview_decoder,
        )


def _load_model(
    spec: str,
    *,
    device: str,
    dtype: str | None,
    cache_dir: Path | None,
    model_config: str | Path | None,
    loras: Mapping[str, Path],
    preview_decoder: Path | None,
) -> LoadedModel:
    torch_device = resolve_device(device)
    torch_dtype = _parse_dtype(dtype) if dtype is not None else default_dtype(torch_device)
    cache = cache_dir if cache_dir is not None else default_cache_dir()

    pipeline: Any  # diffusers pipelines are dynamically typed (components set at runtime)
    if spec in TINY_MODEL_NAMES:
        pipeline = _from_pretrained_folder(_tiny_folder(spec, cache), torch_dtype)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            pipeline = _from_pretrained_folder(path, torch_dtype)
        elif path.is_file():
            if path.suffix.lower() not in _SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(
                    f"the file {spec!r} is not a .safetensors or .ckpt checkpoint (pass one "
                    "of those, or a diffusers folder)"
                )
            _check_checkpoint_file(path)
            config_dir = _model_config_dir(model_config, cache) if model_config else None
            pipeline = _from_single_file(path, config_dir, torch_dtype)
        elif _looks_like_path(spec):
            raise ModelLoadError(
                f"no such file or folder: {spec!r}; pass an existing diffusers folder, a "
                ".safetensors/.ckpt file, a Hub model id, or one of "
                f"{', '.join(TINY_MODEL_NAMES)}"
            )
        else:
            pipeline = _from_hub(spec, torch_dtype)

    try:
        pipeline = pipeline.to(torch_device)
    except Exception as exc:
        raise ModelLoadError(f"could not move model {spec!r} to {torch_device}: {exc}") from exc
    if hasattr(pipeline, "safety_checker"):
        pipeline.safety_checker = None
    pipeline.set_progress_bar_config(disable=True)
    return _describe(spec, pipeline, torch_device, torch_dtype, loras, preview_decoder)


def _tiny_folder(name: str, cache: Path) -> Path:
    try:
        return tiny_model_dir(cache, name)
    except Exception as exc:
        raise ModelLoadError(f"could not build the {name} model in {cache}: {exc}") from exc


def _model_config_dir(model_config: str | Path, cache: Path) -> Path:
    """The diffusers folder that ``--model-config`` names (a tiny name or a folder)."""
    if str(model_config) in TINY_MODEL_NAMES:
        return _tiny_folder(str(model_config), cache)
    folder = Path(model_config).expanduser()
    if not _is_complete_pipeline_dir(folder):
        raise ModelLoadError(
            f"model config {str(model_config)!r} is not a diffusers folder (no "
            "model_index.json there); pass the folder of a diffusers model of the same "
            f"architecture, or one of {', '.join(TINY_MODEL_NAMES)}"
        )
    return folder


def _describe(
    name: str,
    loaded: DiffusionPipeline,
    device: torch.device,
    dtype: torch.dtype,
    loras: Mapping[str, Path],
    preview_decoder: Path | None,
) -> LoadedModel:
    import diffusers

    pipeline: Any = loaded
    family = detect_family(pipeline)
    vae_scale_factor = int(pipeline.vae_scale_factor)
    latent_channels = int(pipeline.vae.config.latent_channels)
    unet_channels = int(pipeline.unet.config.in_channels)
    inpaint_unet = unet_channels == _INPAINT_UNET_CHANNELS and latent_channels == 4
    if unet_channels != latent_channels and not inpaint_unet:
        raise ModelLoadError(
            f"model {name!r} is not supported: its UNet takes {unet_channels} input channels "
            f"but the VAE has {latent_channels} latent channels"
        )
    classes = _SDXL_PIPELINES if family is SDXL_FAMILY else _SD_PIPELINES
    modes = (INPAINT,) if inpaint_unet else MODES
    pipelines: dict[str, Any] = {}
    try:
        for mode in modes:
            cls = getattr(diffusers, classes[mode])
            if type(pipeline) is cls:
                pipelines[mode] = pipeline
            else:
                # dtype= matters: from_pipe otherwise casts the (shared!) modules to fp32.
                with _without_empty_fp32_warning():
                    derived = cls.from_pipe(pipeline, dtype=dtype)
                derived.set_progress_bar_config(disable=True)
                pipelines[mode] = derived
    except Exception as exc:
        raise ModelLoadError(
            f"could not build the {mode} pipeline for model {name!r} "
            f"({type(pipeline).__name__}): {exc}"
        ) from exc
    main = pipelines[modes[0]]
    # Captured before any job replaces the pipelines' scheduler (LoadedModel.make_scheduler).
    scheduler_config = MappingProxyType(copy.deepcopy(dict(pipeline.scheduler.config)))
    adapters = _load_loras(main, loras)
    decoder = _load_preview_decoder(preview_decoder, latent_channels, device, dtype)
    model = LoadedModel(
        name=name,
        family=family,
        pipeline=main,
        device=device,
        dtype=dtype,
        latent_channels=latent_channels,
        vae_scale_factor=vae_scale_factor,
        schedulers=available_schedulers(),
        default_scheduler=_DEFAULT_SCHEDULER,
        default_size=_sample_size(pipeline) * vae_scale_factor,
        modes=modes,
        inpaint_unet=inpaint_unet,
        scheduler_config=scheduler_config,
        loras=tuple(sorted(adapters)),
        preview_decoder=decoder,
        _pipelines=MappingProxyType(pipelines),
        _adapters=MappingProxyType(adapters),
    )
    return model


class _DropRecords(logging.Filter):
    """Drops the log records whose message contains ``fragment``."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextmanager
def _without_log_records(logger_name: str, fragment: str) -> Iterator[None]:
    """While the block runs, ``logger_name`` drops records that contain ``fragment``."""
    logger = logging.getLogger(logger_name)
    drop = _DropRecords(fragment)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _without_empty_fp32_warning() -> AbstractContextManager[None]:
    """No "modules ... should be kept in float32: []" warning from diffusers.

    diffusers 0.42 warns on every ``module.to(dtype)`` even when the list of modules
    to keep in float32 is empty (``[] is not None``), i.e. when there is nothing to
    warn about; ``from_pipe`` does such a cast for every module.
    """
    return _without_log_records("diffusers.models.modeling_utils", "should be kept in float32: []")


def _without_torchvision_notice() -> AbstractContextManager[None]:
    """No "`CLIPImageProcessor` requires torchvision" notices from transformers.

    Importing the diffusers pipelines names transformers' image processors (for the
    safety checker and IP-adapters); without torchvision, transformers 5 falls back to
    its PIL processors and says so once per class. latentcast never runs an image
    processor (no safety checker, no IP-adapter), so the notice only alarms users.
    """
    return _without_log_records("transformers.utils.import_utils", "requires torchvision")


def _load_loras(pipeline: Any, loras: Mapping[str, Path]) -> dict[str, str]:
    """Load every LoRA into ``pipeline``'s modules; return {name: adapter name}.

    Adapters get internal names ("lora0", "lora1", ... in sorted name order) because
    peft rejects some characters (".") that LoRA names may use. Every adapter is left
    disabled.
    """
    adapters: dict[str, str] = {}
    for index, name in enumerate(sorted(loras)):
        path = Path(loras[name]).expanduser()
        adapter = f"lora{index}"
        where = f"LoRA {name!r} from {str(path)!r}"
        if not path.exists():
            raise ModelLoadError(f"could not load {where}: no such file or folder")
        try:
            with warnings.catch_warnings():
                # peft warns about every adapter after the first: several are intended.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipeline.load_lora_weights(str(path), adapter_name=adapter, local_files_only=True)
            present = {a for names in pipeline.get_list_adapters().values() for a in names}
        except Exception as exc:
            raise ModelLoadError(f"could not load {where}: {type(exc).__name__}: {exc}") from exc
        if adapter not in present:
            raise ModelLoadError(
                f"could not load {where}: it holds no LoRA weights for this model's "
                "UNet or text encoders (a LoRA for another architecture?)"
            )
        adapters[name] = adapter
    if adapters:
        try:
            pipeline.disable_lora()
        except Exception as exc:
            raise ModelLoadError(f"could not disable the loaded LoRAs: {exc}") from exc
    return adapters


def _load_preview_decoder(
    folder: Path | None, latent_channels: int, device: torch.device, dtype: torch.dtype
) -> AutoencoderTiny | None:
    if folder is None:
        return None
    from diffusers import AutoencoderTiny

    folder = Path(folder).expanduser()
    try:
        decoder: Any = AutoencoderTiny.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelLoadError(
            f"could not load the preview decoder from {str(folder)!r}: {exc} (expected a local "
            "AutoencoderTiny (TAESD) folder with config.json and its weights)"
        ) from exc
    channels = int(decoder.config.latent_channels)
    if channels != latent_channels:
        raise ModelLoadError(
            f"preview decoder {str(folder)!r} decodes {channels}-channel latents but the "
            f"model has {latent_channels} latent channels (TAESD for another family?)"
        )
    try:
        decoder = decoder.to(device=device, dtype=dtype).eval()
    except Exception as exc:
        raise ModelLoadError(f"could not move the preview decoder to {device}: {exc}") from exc
    loaded: AutoencoderTiny = decoder
    return loaded


def _looks_like_path(spec: str) -> bool:
    """True when ``spec`` cannot be a Hub id ("name" or "owner/name")."""
    if spec.startswith(("/", "./", "../", "~")) or "\\" in spec or spec in (".", ".."):
        return True
    if spec.lower().endswith(_SINGLE_FILE_SUFFIXES):
        return True
    return spec.count("/") > 1 or (len(spec) > 1 and spec[1] == ":")


def _hub_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    import diffusers
    from packaging.version import Version

    # diffusers renamed torch_dtype -> dtype (the old name warns on new versions).
    dtype_key = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    return {dtype_key: dtype}


def _pipeline_kwargs(pipeline_cls: Any) -> dict[str, Any]:
    """Constructor overrides: no safety checker (only for classes that have one)."""
    parameters = inspect.signature(pipeline_cls.__init__).parameters
    return {key: value for key, value in _SAFETY_CHECKER_KWARGS.items() if key in parameters}


def _low_cpu_mem_kwargs() -> dict[str, Any]:
    from diffusers.utils import is_accelerate_available

    # Without accelerate, low_cpu_mem_usage=True only warns and falls back.
    return {"low_cpu_mem_usage": is_accelerate_available()}


_SUPPORTED_PIPELINES = (*_SD_PIPELINES.values(), *_SDXL_PIPELINES.values())


def _pipeline_class(class_name: str | None, where: str) -> Any:
    """The diffusers class for a model_index ``_class_name`` we know how to run."""
    import diffusers

    if class_name not in _SUPPORTED_PIPELINES:
        raise ModelLoadError(
            f"{where} holds a {class_name or 'unknown'} pipeline; latentcast runs Stable "
            "Diffusion 1.x/2.x and SDXL pipelines (StableDiffusion[XL][Img2Img|Inpaint]Pipeline)"
        )
    return getattr(diffusers, str(class_name))


def _model_index_class(folder: Path) -> str | None:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = index.get("_class_name") if isinstance(index, dict) else None
    return name if isinstance(name, str) else None


def _from_pretrained_folder(folder: Path, dtype: torch.dtype) -> DiffusionPipeline:
    class_name = _model_index_class(folder)
    if class_name is None:
        raise ModelLoadError(
            f"could not load a Stable Diffusion pipeline from folder {str(folder)!r}: "
            "no readable model_index.json (expected a diffusers folder with "
            "model_index.json, unet/, vae/, text_encoder/, tokenizer/)"
        )
    cls = _pipeline_class(class_name, f"folder {str(folder)!r}")
    try:
        loaded: DiffusionPipeline = cls.from_pretrained(
            str(folder),
            local_files_only=True,
            **_dtype_kwargs(dtype),
            **_low_cpu_mem_kwargs(),
            **_pipeline_kwargs(cls),
        )
    except Exception as exc:
        raise ModelLoadError(
            f"could not load a Stable Diffusion pipeline from folder {str(folder)!r}: {exc} "
            "(expected a diffusers folder with model_index.json, unet/, vae/, text_encoder/, "
            "tokenizer/)"
        ) from exc
    return loaded


def _check_checkpoint_file(path: Path) -> None:
    """Raise ModelLoadError unless ``path`` looks like a readable checkpoint file.

    Cheap (the safetensors header, or the first bytes of a .ckpt), so a corrupt or
    partial file is named as such before any config is looked for.
    """
    import zipfile

    problem: str | None = None
    if path.stat().st_size == 0:
        problem = "the file is empty"
    elif path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            detail = str(exc).removeprefix("Error while deserializing header: ")
            problem = f"safetensors: {detail}"
    else:
        with path.open("rb") as handle:
            head = handle.read(2)
        # torch.save writes a zip archive; older checkpoints are a bare pickle (protocol 2+).
        if not zipfile.is_zipfile(path) and not (head[:1] == b"\x80" and head[1:2] >= b"\x02"):
            problem = "neither a zip archive nor a pickle, as torch.save writes them"
    if problem is not None:
        raise ModelLoadError(
            f"{str(path)!r} is not a valid checkpoint file ({problem}); expected the "
            "complete weights of a Stable Diffusion 1.x, 2.x or SDXL model as .safetensors "
            "or .ckpt (a partial download or a saved HTML page looks like this: download "
            "it again)"
        )


def _single_file_class(path: Path) -> Any:
    """SD or SDXL pipeline class for a checkpoint, guessed from its key names."""
    import diffusers

    keys: list[str] = []
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as exc:
            raise ModelLoadError(f"could not read checkpoint file {str(path)!r}: {exc}") from exc
    # SDXL checkpoints keep their text encoders under "conditioner.embedders.N".
    if any(key.startswith("conditioner.embedders.") for key in keys):
        return diffusers.StableDiffusionXLPipeline
    return diffusers.StableDiffusionPipeline


def _from_single_file(path: Path, config_dir: Path | None, dtype: torch.dtype) -> DiffusionPipeline:
    if config_dir is not None:
        cls = _pipeline_class(_model_index_class(config_dir), f"model config {str(config_dir)!r}")
        try:
            with _without_empty_fp32_warning():
                loaded: DiffusionPipeline = cls.from_single_file(
                    str(path),
                    config=str(config_dir),
                    local_files_only=True,
                    **_dtype_kwargs(dtype),
                    **_pipeline_kwargs(cls),
                )
        except Exception as exc:
            raise ModelLoadError(
                f"could not load checkpoint file {str(path)!r} with the configs of "
                f"{str(config_dir)!r}: {type(exc).__name__}: {exc} (the model config must be "
                "a diffusers folder of the same architecture as the checkpoint)"
            ) from exc
        return loaded
    if _hub_offline():
        raise ModelLoadError(
            f"could not load checkpoint file {str(path)!r}: a single-file checkpoint holds "
            "only weights, and the configs describing it (UNet, VAE, text encoders, "
            "tokenizers, scheduler) would come from the Hugging Face Hub, which is disabled "
            "(HF_HUB_OFFLINE). Pass --model-config FOLDER with a local diffusers folder of "
            "the same architecture (e.g. the base model's), or convert the checkpoint to a "
            "diffusers folder and pass --model FOLDER"
        )
    cls = _single_file_class(path)
    try:
        with _without_empty_fp32_warning():
            guessed: DiffusionPipeline = cls.from_single_file(
                str(path), **_dtype_kwargs(dtype), **_pipeline_kwargs(cls)
            )
    except Exception as exc:
        raise ModelLoadError(
            f"could not load checkpoint file {str(path)!r}: {exc} (single-file loading needs "
            "the model's config from the Hugging Face Hub; pass --model-config FOLDER with a "
            "local diffusers folder of the same architecture to avoid that)"
        ) from exc
    return guessed


def _from_hub(model_id: str, dtype: torch.dtype) -> DiffusionPipeline:
    from diffusers import DiffusionPipeline

    offline = _hub_offline()
    try:
        # model_index.json first: picks the class (and refuses unsupported ones) before
        # any weights are fetched.
        index: Any = DiffusionPipeline.load_config(model_id, local_files_only=offline)
        class_name = index.get("_class_name") if isinstance(index, Mapping) else None
    except Exception as exc:
        reason = (
            "hub access is disabled (HF_HUB_OFFLINE) and it is not in the local Hugging Face cache"
            if offline
            else "the hub could not be reached or has no such model"
        )
        raise ModelLoadError(
            f"{model_id!r} is not a local folder or file, and {reason}; download it first "
            f"and pass --model PATH (details: {type(exc).__name__}: {exc})"
        ) from exc
    cls = _pipeline_class(class_name, f"hub model {model_id!r}")
    try:
        loaded: DiffusionPipeline = cls.from_pretrained(
            model_id,
            local_files_only=offline,
            **_dtype_kwargs(dtype),
            **_low_cpu_mem_kwargs(),
            **_pipeline_kwargs(cls),
        )
    except Exception as exc:
        raise ModelLoadError(
            f"loading {model_id!r} from the Hugging Face Hub{' cache' if offline else ''} "
            f"failed: {type(exc).__name__}: {exc}; download it first and pass --model PATH"
        ) from exc
    return loaded
