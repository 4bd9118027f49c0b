"""server/images.py: safe decoding, implied sizes, exact compositing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from latentcast.server.images import (
    BadImage,
    check_job_size,
    composite,
    decode_image,
    default_size,
    fit,
)


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    source = Image.new("RGB" if fmt == "JPEG" else "RGBA", (70, 50), (10, 20, 30))
    data = _encoded(source, fmt)
    image = decode_image(data, field="params.init_image", max_pixels=10_000)
    assert image.mode == "RGB" and image.size == (70, 50)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not an image",
        _encoded(Image.new("RGB", (8, 8)), "GIF"),
        _encoded(Image.new("RGB", (8, 8)), "BMP"),
    ],
    ids=["empty", "garbage", "gif", "bmp"],
)
def test_other_data_is_a_bad_image_naming_the_field(data: bytes) -> None:
    with pytest.raises(BadImage, match=r"params\.mask is not a PNG, JPEG or WebP"):
        decode_image(data, field="params.mask", max_pixels=10_000)


def test_truncated_data_is_a_bad_image() -> None:
    data = _encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    with pytest.raises(BadImage, match="could not be decoded"):
        decode_image(data[: len(data) // 2], field="params.init_image", max_pixels=10_000)


def test_an_image_over_the_pixel_limit_is_refused_before_decoding() -> None:
    big = _encoded(Image.new("L", (3000, 3000)), "PNG")
    with pytest.raises(BadImage, match=r"params\.init_image is 3000x3000 pixels; at most"):
        decode_image(big, field="params.init_image", max_pixels=4 * 1024 * 1024)


def test_a_decompression_bomb_is_refused() -> None:
    # 20000x20000 of one colour: a few hundred KB that would decode to 400 MB.
    bomb = _encoded(Image.new("L", (20_000, 20_000)), "PNG")
    assert len(bomb) < 2_000_000
    with pytest.raises(BadImage, match=r"params\.mask is (too large|20000x20000)"):
        decode_image(bomb, field="params.mask", max_pixels=4 * 1024 * 1024)


def test_default_size_rounds_down_to_a_multiple_of_8() -> None:
    assert default_size(Image.new("RGB", (517, 64))) == (512, 64)


def test_check_job_size() -> None:
    check_job_size(64, 1024, max_width=1024, max_height=1024)
    with pytest.raises(BadImage, match="too small"):
        check_job_size(56, 64, max_width=1024, max_height=1024)
    with pytest.raises(BadImage, match="too large"):
        check_job_size(1032, 64, max_width=1024, max_height=1024)


def test_fit_resizes_only_when_needed() -> None:
    image = Image.new("RGB", (80, 64))
    assert fit(image, 80, 64) is image
    assert fit(image, 64, 64).size == (64, 64)


def test_composite_keeps_black_exactly_takes_white_and_blends_grey() -> None:
    rng = np.random.default_rng(0)
    original = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    generated = Image.fromarray(rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
    mask = np.zeros((4, 6), dtype=np.uint8)
    mask[:, 2:4] = 255
    mask[:, 4:] = 128
    out = np.asarray(composite(generated, original, Image.fromarray(mask)), dtype=np.int16)
    old = np.asarray(original, dtype=np.int16)
    new = np.asarray(generated, dtype=np.int16)
    assert (out[:, :2] == old[:, :2]).all()
    assert (out[:, 2:4] == new[:, 2:4]).all()
    expected = old[:, 4:] + (new[:, 4:] - old[:, 4:]) * (128 / 255)
    assert np.abs(out[:, 4:] - expected).max() <= 0.5 + 1e-6
