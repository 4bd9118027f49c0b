"""Unit tests for latentcast.server.previews (latent bytes, latent->RGB, encoding)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from latentcast.server.models import SD1_FAMILY, LatentRGB
from latentcast.server.previews import (
    encode_image,
    fit_max_side,
    latent_to_fp16_bytes,
    latent_to_rgb,
    rgb_preview,
)

SIMPLE = LatentRGB(
    factors=((0.5, 0.0, -0.5), (0.25, 1.0, 0.0)),
    bias=(0.1, -0.2, 0.0),
)


def _gradient_image(width: int = 48, height: int = 32) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)
    y = np.linspace(0, 255, height, dtype=np.float32)
    rgb = np.stack(
        [np.add.outer(y * 0, x), np.add.outer(y, x * 0), np.add.outer(y, x) / 2], axis=-1
    )
    return Image.fromarray(rgb.astype(np.uint8))


# ------------------------------------------------------------------- fp16 latent bytes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_latent_to_fp16_bytes_round_trip(dtype: torch.dtype) -> None:
    latent = torch.randn(4, 5, 7, generator=torch.Generator().manual_seed(0)).to(dtype)
    data = latent_to_fp16_bytes(latent)
    assert isinstance(data, bytes)
    assert len(data) == 4 * 5 * 7 * 2
    decoded = np.frombuffer(data, dtype="<f2").reshape(4, 5, 7)
    assert np.array_equal(decoded, latent.to(torch.float16).numpy())


def test_latent_to_fp16_bytes_is_little_endian_c_order() -> None:
    latent = torch.tensor([[[1.0, 2.0]], [[-2.0, 0.5]]])  # shape [2, 1, 2]
    data = latent_to_fp16_bytes(latent)
    # float16: 1.0 = 0x3C00, 2.0 = 0x4000, -2.0 = 0xC000, 0.5 = 0x3800 (little-endian)
    assert data == bytes.fromhex("003c004000c00038")


def test_latent_to_fp16_bytes_non_contiguous_and_grad() -> None:
    base = torch.randn(4, 6, 8, requires_grad=True)
    view = base.transpose(1, 2)  # [4, 8, 6], not contiguous
    data = latent_to_fp16_bytes(view)
    decoded = np.frombuffer(data, dtype="<f2").reshape(4, 8, 6)
    assert np.array_equal(decoded, view.detach().to(torch.float16).numpy())


def test_latent_to_fp16_bytes_rejects_batched() -> None:
    with pytest.raises(ValueError, match="c, h, w"):
        latent_to_fp16_bytes(torch.zeros(1, 4, 8, 8))


# ------------------------------------------------------------------------ latent->RGB


def test_latent_to_rgb_hand_computed_pixel() -> None:
    latent = np.zeros((2, 2, 3), dtype=np.float32)
    latent[:, 1, 2] = (0.4, 0.8)
    rgb = latent_to_rgb(latent, SIMPLE)
    assert rgb.shape == (2, 3, 3)
    assert rgb.dtype == np.uint8
    # r = 0.4*0.5 + 0.8*0.25 + 0.1 = 0.5   -> round(1.5*127.5)  = 191
    # g = 0.4*0.0 + 0.8*1.0 - 0.2  = 0.6   -> round(1.6*127.5)  = 204
    # b = 0.4*-0.5 + 0.8*0.0 + 0.0 = -0.2  -> round(0.8*127.5)  = 102
    assert rgb[1, 2].tolist() == [191, 204, 102]
    # zero latent -> bias only: r 0.1 -> round(140.25)=140, g -0.2 -> 102, b 0 -> round(127.5)=128
    assert rgb[0, 0].tolist() == [140, 102, 128]


def test_latent_to_rgb_clamps() -> None:
    latent = np.zeros((2, 1, 2), dtype=np.float32)
    latent[0, 0, 0] = 100.0
    latent[0, 0, 1] = -100.0
    rgb = latent_to_rgb(latent, SIMPLE)
    assert rgb[0, 0].tolist() == [255, 102, 0]
    assert rgb[0, 1].tolist() == [0, 102, 255]


def test_latent_to_rgb_matches_reference_loop() -> None:
    assert SD1_FAMILY.latent_rgb is not None
    latent = np.random.default_rng(3).standard_normal((4, 9, 11)).astype(np.float16)
    factors = np.array(SD1_FAMILY.latent_rgb.factors, dtype=np.float64)
    bias = np.array(SD1_FAMILY.latent_rgb.bias, dtype=np.float64)
    ref = np.einsum("chw,ck->hwk", latent.astype(np.float64), factors) + bias
    ref = np.rint((np.clip(ref, -1, 1) + 1) * 127.5)
    got = latent_to_rgb(latent, SD1_FAMILY.latent_rgb).astype(np.int16)
    assert np.abs(got - ref).max() <= 1


def test_latent_to_rgb_channel_mismatch() -> None:
    with pytest.raises(ValueError, match="channels"):
        latent_to_rgb(np.zeros((3, 4, 4), dtype=np.float32), SIMPLE)


# ----------------------------------------------------------------------- fit_max_side


@pytest.mark.parametrize(
    ("size", "max_side", "expected"),
    [
        ((512, 512), None, (512, 512)),
        ((512, 512), 256, (256, 256)),
        ((512, 512), 512, (512, 512)),
        ((64, 48), 256, (64, 48)),  # never upscale
        ((768, 512), 256, (256, 171)),
        ((512, 768), 256, (171, 256)),
        ((1000, 1), 100, (100, 1)),  # each side at least 1
        ((1, 1000), 10, (1, 10)),
        ((7, 5), 1, (1, 1)),
    ],
)
def test_fit_max_side(
    size: tuple[int, int], max_side: int | None, expected: tuple[int, int]
) -> None:
    assert fit_max_side(size[0], size[1], max_side) == expected


def test_fit_max_side_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        fit_max_side(0, 10, None)
    with pytest.raises(ValueError):
        fit_max_side(10, 10, 0)


# ----------------------------------------------------------------------- encode_image


@pytest.mark.parametrize(
    ("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")]
)
def test_encode_image_decodes(fmt: str, pil_format: str) -> None:
    image = _gradient_image()
    data = encode_image(image, fmt)  # type: ignore[arg-type]
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == pil_format
    assert decoded.size == image.size
    assert decoded.mode == "RGB"
    assert encode_image(image, fmt) == data  # type: ignore[arg-type]


def test_encode_png_is_lossless_and_identical() -> None:
    image = _gradient_image()
    first = encode_image(image, "png")
    assert encode_image(image, "png", quality=5) == first  # quality ignored
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(first))), np.asarray(image))


def test_encode_image_converts_to_rgb() -> None:
    rgba = _gradient_image().convert("RGBA")
    decoded = Image.open(io.BytesIO(encode_image(rgba, "png")))
    assert decoded.mode == "RGB"
    gray = _gradient_image().convert("L")
    assert Image.open(io.BytesIO(encode_image(gray, "jpeg"))).mode == "RGB"


def test_encode_image_quality_matters_for_jpeg() -> None:
    image = _gradient_image(128, 128)
    assert len(encode_image(image, "jpeg", quality=20)) < len(
        encode_image(image, "jpeg", quality=95)
    )


def test_encode_image_rejects_bad_arguments() -> None:
    image = _gradient_image()
    with pytest.raises(ValueError, match="gif"):
        encode_image(image, "gif")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quality"):
        encode_image(image, "jpeg", quality=0)


# ------------------------------------------------------------------------ rgb_preview


@pytest.mark.parametrize("fmt", ["jpeg", "webp"])
def test_rgb_preview_full_size(fmt: str) -> None:
    assert SD1_FAMILY.latent_rgb is not None
    latent = np.random.default_rng(0).standard_normal((4, 64, 48)).astype(np.float32)
    data, width, height = rgb_preview(latent, SD1_FAMILY.latent_rgb, fmt, None)  # type: ignore[arg-type]
    assert (width, height) == (48, 64)
    decoded = Image.open(io.BytesIO(data))
    assert decoded.format == fmt.upper()
    assert decoded.size == (48, 64)


def test_rgb_preview_downscales_only() -> None:
    assert SD1_FAMILY.latent_rgb is not None
    latent = np.random.default_rng(0).standard_normal((4, 64, 96)).astype(np.float32)
    data, width, height = rgb_preview(latent, SD1_FAMILY.latent_rgb, "jpeg", 48)
    assert (width, height) == (48, 32)
    assert Image.open(io.BytesIO(data)).size == (48, 32)
    _, width, height = rgb_preview(latent, SD1_FAMILY.latent_rgb, "jpeg", 1024)
    assert (width, height) == (96, 64)


def test_rgb_preview_is_deterministic() -> None:
    assert SD1_FAMILY.latent_rgb is not None
    latent = np.random.default_rng(1).standard_normal((4, 32, 32)).astype(np.float32)
    first = rgb_preview(latent, SD1_FAMILY.latent_rgb, "jpeg", None)
    assert rgb_preview(latent, SD1_FAMILY.latent_rgb, "jpeg", None) == first
