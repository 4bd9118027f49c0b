"""Images that clients send (``init_image``, ``mask``, control images): decode safely,
size, preprocess, composite.

Everything here turns bad input into :class:`BadImage`, whose message names the field,
and never lets a decompression bomb be decoded: the pixel count is checked from the
header before any pixel data is touched.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from latentcast.protocol import GenerationParams, Limits
from latentcast.protocol.limits import MIN_SIDE, SIDE_MULTIPLE

from .jobs import JobControl

#: An init image may have up to this many times the pixels of the largest job: it is
#: scaled to the job size, and bigger uploads are refused unread (bad_image).
INPUT_PIXELS_FACTOR = 4

#: cv2.Canny's hysteresis thresholds for ``preprocess: "canny"``: the values of the
#: diffusers ControlNet documentation (and of the canny ControlNets' training data).
CANNY_LOW_THRESHOLD = 100
CANNY_HIGH_THRESHOLD = 200

#: The formats PROTOCOL.md allows for init_image, mask and control images.
ACCEPTED_FORMATS = ("PNG", "JPEG", "WEBP")


class BadImage(Exception):
    """An init_image, mask or control image that cannot be used; ``message`` names the field."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def decode_image(data: bytes, *, field: str, max_pixels: int, mode: str = "RGB") -> Image.Image:
    """Decode a PNG, JPEG or WebP into ``mode``; refuse anything else or anything huge."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
            width, height = image.size
            if width * height > max_pixels:
                raise BadImage(
                    f"{field} is {width}x{height} pixels; at most {max_pixels} pixels are accepted"
                )
            image.load()
    except BadImage:
        raise
    except UnidentifiedImageError:
        raise BadImage(f"{field} is not a PNG, JPEG or WebP image") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise BadImage(f"{field} is too large to decode") from None
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt data, in many forms
        raise BadImage(f"{field} could not be decoded: {exc}") from None
    if width < 1 or height < 1:
        raise BadImage(f"{field} has no pixels")
    return image.convert(mode)


def default_size(image: Image.Image) -> tuple[int, int]:
    """The job size an init image implies: its own, rounded down to a multiple of 8."""
    width, height = image.size
    return width - width % SIDE_MULTIPLE, height - height % SIDE_MULTIPLE


def check_job_size(width: int, height: int, *, max_width: int, max_height: int) -> None:
    """Refuse an init image whose implied size is out of the server's limits."""
    if width < MIN_SIDE or height < MIN_SIDE:
        raise BadImage(
            f"init_image is too small: {width}x{height} after rounding down to a multiple of "
            f"{SIDE_MULTIPLE}; at least {MIN_SIDE}x{MIN_SIDE} (or give params.width/height)"
        )
    if width > max_width or height > max_height:
        raise BadImage(
            f"init_image is too large: {width}x{height}; at most {max_width}x{max_height} "
            "(or give params.width and params.height to scale it)"
        )


def fit(image: Image.Image, width: int, height: int) -> Image.Image:
    """``image`` at exactly width x height (resampled only when it differs)."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


def composite(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """Keep ``original`` where the mask is black, take ``generated`` where it is white.

    Grey blends linearly. Pixels under pure black come out exactly as they went in, which
    is what a canvas tool needs: the part the user did not paint never changes.
    """
    weight = np.asarray(mask.convert("L"), dtype=np.float32)[..., None] / 255.0
    new = np.asarray(generated.convert("RGB"), dtype=np.float32)
    old = np.asarray(original.convert("RGB"), dtype=np.float32)
    blended = np.rint(old + (new - old) * weight).clip(0, 255).astype(np.uint8)
    return Image.fromarray(blended, "RGB")


def prepare_images(
    params: GenerationParams, limits: Limits
) -> tuple[Image.Image, Image.Image | None, int, int]:
    """Decode init_image (and mask) and settle the job size; runs off the event loop.

    Without params.width/height the size is the init image's, rounded down to a multiple
    of 8; the images are then resampled to the job size when it differs.
    """
    assert params.init_image is not None
    max_pixels = INPUT_PIXELS_FACTOR * limits.max_width * limits.max_height
    init = decode_image(params.init_image, field="params.init_image", max_pixels=max_pixels)
    mask = None
    if params.mask is not None:
        mask = decode_image(params.mask, field="params.mask", max_pixels=max_pixels, mode="L")
        if mask.size != init.size:
            raise BadImage(
                f"params.mask is {mask.width}x{mask.height} but params.init_image is "
                f"{init.width}x{init.height}: they must be the same size"
            )
    implied_width, implied_height = default_size(init)
    width = params.width or implied_width
    height = params.height or implied_height
    check_job_size(width, height, max_width=limits.max_width, max_height=limits.max_height)
    return fit(init, width, height), fit(mask, width, height) if mask else None, width, height


def canny_edges(image: Image.Image) -> Image.Image:
    """White edges on black (RGB), as the canny ControlNets were trained on.

    OpenCV's Canny on the grey image, thresholds 100/200, as the diffusers docs do. One
    OpenCV thread: this runs beside the engine, on a worker thread per submit.
    """
    import cv2

    cv2.setNumThreads(1)
    grey = np.asarray(image.convert("L"))
    edges = cv2.Canny(grey, CANNY_LOW_THRESHOLD, CANNY_HIGH_THRESHOLD)
    return Image.fromarray(np.stack([edges] * 3, axis=-1), "RGB")


def preprocess_control(image: Image.Image, preprocess: str) -> Image.Image:
    """``params.controls.N.preprocess`` applied to an RGB image: "none", "canny", "invert"."""
    if preprocess == "canny":
        return canny_edges(image)
    if preprocess == "invert":
        return ImageOps.invert(image.convert("RGB"))
    if preprocess == "none":
        return image
    raise ValueError(f"unknown preprocess {preprocess!r}")


def prepare_controls(
    params: GenerationParams, limits: Limits, width: int, height: int
) -> tuple[JobControl, ...]:
    """Decode every control image, scale it to the job size and preprocess it; runs off
    the event loop. Raises :class:`BadImage` naming ``params.controls.N.image``."""
    max_pixels = INPUT_PIXELS_FACTOR * limits.max_width * limits.max_height
    controls = []
    for index, control in enumerate(params.controls):
        image = decode_image(
            control.image, field=f"params.controls.{index}.image", max_pixels=max_pixels
        )
        image = preprocess_control(fit(image, width, height), control.preprocess)
        controls.append(
            JobControl(
                name=control.name,
                image=image,
                scale=control.scale,
                start=control.start,
                end=control.end,
            )
        )
    return tuple(controls)
