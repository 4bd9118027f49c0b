"""Images in and out: request inputs as bytes, results and previews as PIL images.

A latent preview is turned into a rough RGB picture with the model's ``latent_rgb``
factors from ``welcome`` (PROTOCOL.md section 2), so a client can show one without a
decoder of its own.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image

from latentcast.protocol import ImagePreview, ImageResult, LatentPreview, LatentRGBInfo

#: What ``init_image`` and ``mask`` accept: encoded bytes (PNG, JPEG or WebP), a PIL
#: image (sent as PNG) or a path to an image file (sent as it is on disk).
ImageInput: TypeAlias = bytes | bytearray | memoryview | Image.Image | str | os.PathLike[str]


def image_bytes(image: ImageInput) -> bytes:
    """The bytes to send for an input image."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(image, (str, os.PathLike)):
        return Path(image).read_bytes()
    raise TypeError(f"expected image bytes, a PIL image or a path, got {type(image).__name__}")


@dataclass(frozen=True)
class GeneratedImage:
    """One finished image of a job: the encoded bytes as the server sent them."""

    data: bytes
    format: str
    width: int
    height: int
    seed: int

    @classmethod
    def from_wire(cls, image: ImageResult) -> GeneratedImage:
        """From the protocol's ``complete.images`` item."""
        return cls(
            data=image.data,
            format=image.format,
            width=image.width,
            height=image.height,
            seed=image.seed,
        )

    @property
    def suffix(self) -> str:
        """The usual file suffix for :attr:`format`: ``.png``, ``.jpg`` or ``.webp``."""
        return {"jpeg": ".jpg"}.get(self.format, f".{self.format}")

    def to_pil(self) -> Image.Image:
        """Decode the image (fully loaded, so the bytes can go)."""
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the encoded bytes as they are to ``path``; returns the path."""
        target = Path(path)
        target.write_bytes(self.data)
        return target


def latent_to_pil(preview: LatentPreview, latent_rgb: LatentRGBInfo) -> Image.Image:
    """A rough RGB picture of a latent preview (PROTOCOL.md section 2's formula)."""
    channels, height, width = preview.shape
    if len(latent_rgb.factors) != channels:
        raise ValueError(
            f"the preview has {channels} latent channels but latent_rgb has factors for "
            f"{len(latent_rgb.factors)}"
        )
    latent = np.frombuffer(preview.data, dtype="<f2").astype(np.float32)
    latent = latent.reshape(channels, height, width)
    factors = np.asarray(latent_rgb.factors, dtype=np.float32)  # [c, 3]
    bias = np.asarray(latent_rgb.bias, dtype=np.float32)  # [3]
    rgb = np.einsum("chw,ck->hwk", latent, factors) + bias
    rgb = np.clip(rgb, -1.0, 1.0)
    pixels = np.round((rgb + 1.0) * 127.5).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def preview_to_pil(
    preview: LatentPreview | ImagePreview, latent_rgb: LatentRGBInfo | None
) -> Image.Image:
    """Any preview as a PIL image: decoded (image kind) or mapped to RGB (latent kind)."""
    if isinstance(preview, ImagePreview):
        image = Image.open(io.BytesIO(preview.data))
        image.load()
        return image
    if latent_rgb is None:
        raise ValueError("this model has no latent_rgb factors: ask for image previews instead")
    return latent_to_pil(preview, latent_rgb)
