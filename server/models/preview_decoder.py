"""The optional preview decoder (TAESD): loading and checking it against the model."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ModelLoadError

if TYPE_CHECKING:
    from diffusers import AutoencoderTiny


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
