"""Limits and defaults that a server announces in ``welcome`` and validates against.

They are plain frozen models so that the server can build them from its configuration
and clients can read them back from ``welcome`` with the same types.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: Protocol version spoken by this package (``welcome.protocol``).
PROTOCOL_VERSION = 1

#: Job ids: 1 to 64 characters of this alphabet.
JOB_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
JOB_ID_MAX_LENGTH = 64

MAX_SEED = 2**32 - 1
#: Seeds are taken modulo this (image k of a job uses seed + k).
SEED_SPACE = MAX_SEED + 1
MIN_SIDE = 64
SIDE_MULTIPLE = 8
MAX_GUIDANCE_SCALE = 30.0
MAX_LORA_SCALE = 10.0
MAX_CONTROL_SCALE = 2.0
MIN_PREVIEW_SIDE = 8

DEFAULT_MAX_BAD_FRAMES = 16

#: Structural bounds of every client message (PROTOCOL.md section 1): a list or map with
#: more entries, or a value nested deeper, is a ``bad_frame``. No valid message comes near.
MAX_CONTAINER_ENTRIES = 256
MAX_NESTING_DEPTH = 32
#: ``params.loras``: at most this many entries.
MAX_LORAS = 16
DEFAULT_STRENGTH = 0.8
DEFAULT_OUTPUT_QUALITY = 90


class Limits(BaseModel):
    """``welcome.limits``: the bounds every submit is checked against."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    max_width: int = Field(default=1024, ge=64)
    max_height: int = Field(default=1024, ge=64)
    max_steps: int = Field(default=150, ge=1)
    max_images: int = Field(default=4, ge=1)
    max_prompt_chars: int = Field(default=2000, ge=0)
    max_jobs_per_session: int = Field(default=8, ge=1)
    max_message_bytes: int = Field(default=64 * 2**20, ge=1024)
    max_bad_frames: int = Field(default=DEFAULT_MAX_BAD_FRAMES, ge=1)
    #: ControlNet inputs per job (feature "controls"); 0 on a server without the feature.
    max_controls: int = Field(default=0, ge=0)


class Defaults(BaseModel):
    """``welcome.defaults``: what an absent optional ``params`` key means."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    width: int = 512
    height: int = 512
    steps: int = 20
    guidance_scale: float = 7.5
    scheduler: str = "euler"
