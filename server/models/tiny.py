"""The built-in tiny models: in-process builders and their on-disk cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .modes import _INPAINT_UNET_CHANNELS, _SAFETY_CHECKER_KWARGS

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import CLIPTokenizer

TINY_MODEL_NAME = "tiny"
TINY_SDXL_MODEL_NAME = "tiny-sdxl"
TINY_INPAINT_MODEL_NAME = "tiny-inpaint"
#: Every built-in tiny model name (valid ``--model`` and ``--model-config`` values).
TINY_MODEL_NAMES = (TINY_MODEL_NAME, TINY_SDXL_MODEL_NAME, TINY_INPAINT_MODEL_NAME)
# Bump whenever a tiny builder changes: the cache folder name includes it, so a
# changed builder never reuses weights saved by an older one.
TINY_MODEL_VERSION = "v1"


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
