"""server/images.py: safe decoding, implied sizes, exact compositing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from latentcast.protocol import ControlRef, GenerationParams, Limits
from latentcast.server.images import (
    BadImage,
    canny_edges,
    check_job_size,
    composite,
    decode_image,
    default_size,
    fit,
    prepare_controls,
    preprocess_control,
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


# ---------------------------------------------------------------------- control images


def _stroke() -> Image.Image:
    """Black strokes on white (a scribble), 64x64: a square outline."""
    pixels = np.full((64, 64, 3), 255, dtype=np.uint8)
    pixels[16:48, 16:20] = 0
    pixels[16:48, 44:48] = 0
    pixels[16:20, 16:48] = 0
    pixels[44:48, 16:48] = 0
    return Image.fromarray(pixels, "RGB")


def test_canny_marks_the_edges_white_on_black_and_nothing_else() -> None:
    edges = np.asarray(preprocess_control(_stroke(), "canny"))
    assert edges.shape == (64, 64, 3)
    assert set(np.unique(edges)) <= {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 1] == edges[..., 2]).all()
    # Edges along the strokes' borders; flat regions (inside and outside) stay black.
    assert edges[..., 0].any()
    assert not edges[:10, :10].any() and not edges[26:38, 26:38].any()
    assert edges[30, 14:22, 0].any()  # the left stroke's border
    # A flat image has no edges at all.
    flat = np.asarray(preprocess_control(Image.new("RGB", (32, 32), (90, 90, 90)), "canny"))
    assert not flat.any()


def test_canny_is_opencv_canny_with_the_documented_thresholds() -> None:
    import cv2

    image = _stroke()
    expected = cv2.Canny(np.asarray(image.convert("L")), 100, 200)
    assert np.array_equal(np.asarray(canny_edges(image))[..., 0], expected)


def test_invert_and_none() -> None:
    image = _stroke()
    inverted = np.asarray(preprocess_control(image, "invert"))
    assert np.array_equal(inverted, 255 - np.asarray(image))
    assert preprocess_control(image, "none") is image
    with pytest.raises(ValueError):
        preprocess_control(image, "sobel")


def test_prepare_controls_scales_to_the_job_size_then_preprocesses() -> None:
    params = GenerationParams(
        prompt="p",
        controls=[
            ControlRef(name="a", image=_encoded(_stroke(), "PNG"), scale=0.5, start=0.2),
            ControlRef(name="b", image=_encoded(_stroke(), "PNG"), preprocess="invert", end=0.5),
        ],
    )
    first, second = prepare_controls(params, Limits(), 96, 32)
    assert (first.name, first.scale, first.start, first.end) == ("a", 0.5, 0.2, 1.0)
    assert (second.name, second.scale, second.start, second.end) == ("b", 1.0, 0.0, 0.5)
    assert first.image.size == second.image.size == (96, 32)
    assert first.image.mode == second.image.mode == "RGB"
    assert np.array_equal(np.asarray(second.image), 255 - np.asarray(fit(_stroke(), 96, 32)))


@pytest.mark.parametrize("data", [b"not an image", _encoded(Image.new("RGB", (8, 8)), "GIF")])
def test_a_bad_control_image_names_its_field(data: bytes) -> None:
    params = GenerationParams(
        prompt="p",
        controls=[
            ControlRef(name="a", image=_encoded(_stroke(), "PNG")),
            ControlRef(name="b", image=data),
        ],
    )
    with pytest.raises(BadImage, match=r"params\.controls\.1\.image"):
        prepare_controls(params, Limits(), 64, 64)


def test_a_huge_control_image_is_refused_unread() -> None:
    limits = Limits(max_width=64, max_height=64)
    big = _encoded(Image.new("RGB", (300, 300)), "PNG")  # over 4 x 64 x 64 pixels
    params = GenerationParams(prompt="p", controls=[ControlRef(name="a", image=big)])
    with pytest.raises(BadImage, match=r"params\.controls\.0\.image is 300x300"):
        prepare_controls(params, limits, 64, 64)
