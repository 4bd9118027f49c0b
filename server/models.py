"""Model building and loading for the latentcast server.

This module knows how to turn a ``--model`` spec into a ready-to-run
:class:`LoadedModel`:

* ``"tiny"``: a tiny, randomly initialised but structurally real Stable Diffusion
  1.x pipeline (real diffusers/transformers classes, VAE scale factor 8, four
  latent channels). It is built in-process, saved once into the cache directory
  and then loaded through exactly the same ``from_pretrained`` path as a real
  diffusers folder. It needs no network and runs fast on a CPU, which makes it the
  model for tests, CI and demos.
* a local diffusers folder (``from_pretrained``, local files only);
* a local ``.safetensors`` / ``.ckpt`` single-file checkpoint (best effort);
* anything else is treated as a Hugging Face Hub model id.

Heavy imports (diffusers, transformers) are done lazily inside the functions that
need them, so importing this module (for example for :class:`LatentRGB`) is cheap.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from diffusers.schedulers.scheduling_utils import SchedulerMixin
    from transformers import CLIPTokenizer

__all__ = [
    "SD1_FAMILY",
    "TINY_MODEL_NAME",
    "TINY_MODEL_VERSION",
    "LatentRGB",
    "LoadedModel",
    "ModelFamily",
    "ModelLoadError",
    "build_tiny_pipeline",
    "default_cache_dir",
    "default_dtype",
    "load_model",
    "resolve_device",
    "tiny_model_dir",
]

TINY_MODEL_NAME = "tiny"
# Bump whenever build_tiny_pipeline() changes: the cache folder name includes it,
# so a changed builder never reuses weights saved by an older one.
TINY_MODEL_VERSION = "v1"

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
_DTYPES: tuple[tuple[str, torch.dtype], ...] = (
    ("float16", torch.float16),
    ("bfloat16", torch.bfloat16),
    ("float32", torch.float32),
)
# Per-job selectable schedulers: (name, diffusers class name).
_SCHEDULERS: tuple[tuple[str, str], ...] = (("euler", "EulerDiscreteScheduler"),)
_DEFAULT_SCHEDULER = "euler"


class ModelLoadError(Exception):
    """A model spec could not be turned into a loaded pipeline."""


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
    """An architecture family: decides latent layout and preview factors."""

    name: str
    latent_rgb: LatentRGB | None


# The well-known SD 1.5 factors (ComfyUI comfy/latent_formats.py, class SD15, which
# defines no bias). SD 2.x shares the same VAE, so the factors serve it as well.
SD1_FAMILY = ModelFamily(
    name="sd1",
    latent_rgb=LatentRGB(
        factors=(
            (0.3512, 0.2297, 0.3227),
            (0.3250, 0.4974, 0.2350),
            (-0.2829, 0.1762, 0.2721),
            (-0.2120, -0.2616, -0.7177),
        ),
        bias=(0.0, 0.0, 0.0),
    ),
)


@dataclass(frozen=True)
class LoadedModel:
    """A pipeline ready to generate, plus the facts the server needs about it."""

    name: str
    family: ModelFamily
    pipeline: StableDiffusionPipeline
    device: torch.device
    dtype: torch.dtype
    latent_channels: int
    vae_scale_factor: int
    schedulers: tuple[str, ...]
    default_scheduler: str
    default_size: int

    def make_scheduler(self, name: str) -> SchedulerMixin:
        """Return a fresh scheduler instance for one job.

        Schedulers are stateful (timesteps, step index), so every job needs its own.
        The instance is built from the pipeline's scheduler config, which keeps the
        model's training noise schedule (betas, offsets, prediction type).

        Raises:
            ValueError: ``name`` is not one of :attr:`schedulers`.
        """
        import diffusers

        class_name = dict(_SCHEDULERS).get(name) if name in self.schedulers else None
        if class_name is None:
            known = ", ".join(self.schedulers)
            raise ValueError(f"unknown scheduler {name!r}; available: {known}")
        scheduler_cls = getattr(diffusers, class_name)
        # diffusers registers pipeline components dynamically: untyped for mypy.
        pipeline: Any = self.pipeline
        scheduler: SchedulerMixin = scheduler_cls.from_config(pipeline.scheduler.config)
        return scheduler


# --------------------------------------------------------------------------- devices


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


# ------------------------------------------------------------------------- tiny model


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


def _build_tiny_tokenizer() -> CLIPTokenizer:
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


def build_tiny_pipeline() -> StableDiffusionPipeline:
    """Build the tiny SD 1.x pipeline in-process (random init, no download).

    Deterministic: every component is initialised under a fixed seed inside a
    forked RNG, so two builds give identical weights and the caller's global torch
    RNG state is left untouched. VAE has 4 blocks (scale factor 8), latents have 4
    channels, the scheduler is Euler with SD's training schedule.
    """
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _build_tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
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
        vae = AutoencoderKL(
            sample_size=64,
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8, 16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=1,
            norm_num_groups=8,
        )
        torch.manual_seed(2)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    modules: tuple[Any, ...] = (unet, vae, text_encoder)
    for module in modules:
        module.eval()
    pipeline: Any = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    built: StableDiffusionPipeline = pipeline
    return built


def default_cache_dir() -> Path:
    """The tiny model's cache root.

    ``$LATENTCAST_CACHE_DIR``, else ``$XDG_CACHE_HOME/latentcast``, else ``~/.cache/latentcast``.
    """
    explicit = os.environ.get("LATENTCAST_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "latentcast"
    return Path.home() / ".cache" / "latentcast"


def tiny_model_dir(cache_dir: Path) -> Path:
    """Return the folder holding the saved tiny pipeline, building it if missing.

    The folder is ``cache_dir / "tiny-<version>"``. Creation is atomic: the pipeline
    is saved into a temporary sibling folder which is then renamed into place with
    :func:`os.replace`, so a crash or a concurrent process never leaves (or sees) a
    half-written model. If another process wins the race, its folder is kept and
    ours is discarded.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{TINY_MODEL_NAME}-{TINY_MODEL_VERSION}"
    if _is_complete_pipeline_dir(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=cache_dir))
    try:
        pipeline: Any = build_tiny_pipeline()
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


# ---------------------------------------------------------------------------- loading


def load_model(
    spec: str,
    *,
    device: str = "auto",
    dtype: str | None = None,
    cache_dir: Path | None = None,
) -> LoadedModel:
    """Load a Stable Diffusion 1.x/2.x pipeline from ``spec``.

    ``spec`` may be:

    * ``"tiny"``: the built-in tiny model (built into ``cache_dir`` on first use,
      then loaded like any diffusers folder);
    * an existing diffusers folder: ``from_pretrained(folder, local_files_only=True)``;
    * an existing ``.safetensors`` / ``.ckpt`` file: ``from_single_file`` (best
      effort: diffusers fetches the matching model config from the Hub unless it
      is already in the local Hugging Face cache; fully offline config handling is
      future work);
    * otherwise a Hugging Face Hub model id (honours ``HF_HUB_OFFLINE`` /
      ``TRANSFORMERS_OFFLINE`` read at call time: offline means the local HF cache only).

    ``dtype`` is ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``None`` for
    :func:`default_dtype` of the device. The pipeline is moved to the device, its
    progress bar disabled and its safety checker removed.

    Raises:
        ValueError: bad ``device`` or ``dtype`` string, or device unavailable.
        ModelLoadError: the model could not be found or loaded.
    """
    torch_device = resolve_device(device)
    torch_dtype = _parse_dtype(dtype) if dtype is not None else default_dtype(torch_device)

    pipeline: Any  # diffusers pipelines are dynamically typed (components set at runtime)
    if spec == TINY_MODEL_NAME:
        cache = cache_dir if cache_dir is not None else default_cache_dir()
        try:
            folder = tiny_model_dir(cache)
        except Exception as exc:
            raise ModelLoadError(f"could not build the tiny model in {cache}: {exc}") from exc
        pipeline = _from_pretrained_folder(folder, torch_dtype)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            pipeline = _from_pretrained_folder(path, torch_dtype)
        elif path.is_file():
            if path.suffix.lower() not in _SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(
                    f"could not load model {spec!r}: a file must be a .safetensors or .ckpt "
                    "checkpoint (or pass a diffusers folder)"
                )
            pipeline = _from_single_file(path, torch_dtype)
        elif _looks_like_path(spec):
            raise ModelLoadError(
                f"could not load model {spec!r}: no such file or folder; pass an existing "
                "diffusers folder, a .safetensors/.ckpt file, a Hub model id, or 'tiny'"
            )
        else:
            pipeline = _from_hub(spec, torch_dtype)

    try:
        pipeline = pipeline.to(torch_device)
    except Exception as exc:
        raise ModelLoadError(f"could not move model {spec!r} to {torch_device}: {exc}") from exc
    pipeline.set_progress_bar_config(disable=True)
    pipeline.safety_checker = None
    return _describe(spec, pipeline, torch_device, torch_dtype)


def _describe(
    name: str, loaded: StableDiffusionPipeline, device: torch.device, dtype: torch.dtype
) -> LoadedModel:
    pipeline: Any = loaded
    vae_scale_factor = int(pipeline.vae_scale_factor)
    latent_channels = int(pipeline.vae.config.latent_channels)
    unet_channels = int(pipeline.unet.config.in_channels)
    if unet_channels != latent_channels:
        raise ModelLoadError(
            f"model {name!r} is not a plain text-to-image model: its UNet takes {unet_channels} "
            f"input channels but the VAE has {latent_channels} latent channels (inpainting model?)"
        )
    sample_size = pipeline.unet.config.sample_size
    if isinstance(sample_size, (list, tuple)):
        sample_size = max(sample_size)
    return LoadedModel(
        name=name,
        family=SD1_FAMILY,
        pipeline=pipeline,
        device=device,
        dtype=dtype,
        latent_channels=latent_channels,
        vae_scale_factor=vae_scale_factor,
        schedulers=tuple(scheduler for scheduler, _ in _SCHEDULERS),
        default_scheduler=_DEFAULT_SCHEDULER,
        default_size=int(sample_size) * vae_scale_factor,
    )


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


def _loading_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """Keyword arguments shared by every diffusers loader call."""
    import diffusers
    from packaging.version import Version

    # diffusers renamed torch_dtype -> dtype (the old name warns on new versions).
    dtype_key = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    return {
        dtype_key: dtype,
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _pretrained_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    """Loader kwargs for ``from_pretrained`` (folder or Hub id)."""
    from diffusers.utils import is_accelerate_available

    # Without accelerate, low_cpu_mem_usage=True only warns and falls back.
    return {**_loading_kwargs(dtype), "low_cpu_mem_usage": is_accelerate_available()}


def _from_pretrained_folder(folder: Path, dtype: torch.dtype) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_pretrained(
            str(folder), local_files_only=True, **_pretrained_kwargs(dtype)
        )
    except Exception as exc:
        raise ModelLoadError(
            f"could not load a Stable Diffusion pipeline from folder {str(folder)!r}: {exc} "
            "(expected a diffusers folder with model_index.json, unet/, vae/, text_encoder/, "
            "tokenizer/)"
        ) from exc


def _from_single_file(path: Path, dtype: torch.dtype) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_single_file(
            str(path), local_files_only=_hub_offline(), **_loading_kwargs(dtype)
        )
    except Exception as exc:
        raise ModelLoadError(
            f"could not load checkpoint file {str(path)!r}: {exc} (single-file loading needs "
            "the model's config from the Hugging Face Hub or its local cache; converting the "
            "checkpoint to a diffusers folder and passing --model FOLDER avoids that)"
        ) from exc


def _from_hub(model_id: str, dtype: torch.dtype) -> StableDiffusionPipeline:
    from diffusers import StableDiffusionPipeline

    offline = _hub_offline()
    try:
        return StableDiffusionPipeline.from_pretrained(
            model_id, local_files_only=offline, **_pretrained_kwargs(dtype)
        )
    except Exception as exc:
        reason = (
            "hub access is disabled (HF_HUB_OFFLINE) and it is not in the local Hugging Face cache"
            if offline
            else "the hub could not be reached or has no such model"
        )
        raise ModelLoadError(
            f"could not load model {model_id!r}: not a local folder or file, and {reason}; "
            f"download it first and pass --model PATH (details: {type(exc).__name__}: {exc})"
        ) from exc
