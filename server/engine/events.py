"""What goes into the engine core and what comes out: plain data, no sessions, no loop.

A :class:`JobSpec` goes in; per-step events come out, each naming the job by the key
the caller chose. Nothing here refers to a session, a socket or an event loop, so that a
core can run in another process or on another machine with the same interface.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from latentcast.protocol import ImageResult

from ..jobs import GenerationRequest


@dataclass(frozen=True)
class JobSpec:
    """A job for the core: the caller's key for it and what to generate."""

    key: Hashable
    request: GenerationRequest


class LatentSnapshot:
    """A copy of the first image's latent after a step, taken on the engine thread.

    On a CPU the copy is a numpy array already, so the event loop's thread, which
    reads it, runs no torch at all (see ``_load`` in :mod:`latentcast.server.app` for
    why that matters). On CUDA the copy goes to pinned memory without blocking the
    engine; whoever reads it first waits for that copy only (an event), never for
    later steps.
    """

    def __init__(self, latents: torch.Tensor, rgb: np.ndarray | None = None) -> None:
        #: The preview decoder's picture of this latent, when the job wants one and the
        #: model has a decoder (decoded on the engine thread, where the model lives).
        self.rgb = rgb
        first = latents[0].detach()
        self.shape: tuple[int, int, int] = tuple(first.shape)  # type: ignore[assignment]
        self._array: np.ndarray | None = None
        self._pinned: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        if first.is_cuda:
            self._pinned = torch.empty(self.shape, dtype=torch.float16, pin_memory=True)
            self._pinned.copy_(first, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._array = first.to(device="cpu", dtype=torch.float16, copy=True).numpy()

    def array(self) -> np.ndarray:
        """The latent as float16 [c, h, w] in host memory."""
        if self._array is None:
            assert self._ready is not None and self._pinned is not None
            self._ready.synchronize()
            self._array = self._pinned.numpy()
        return self._array

    def fp16_bytes(self) -> bytes:
        """The payload of a latent preview (PROTOCOL.md: little-endian float16, C order)."""
        return self.array().astype("<f2", copy=False).tobytes(order="C")

    def __getstate__(self) -> dict[str, Any]:
        # To another process (a Ray engine's front end): the host copy only.
        return {**self.__dict__, "_array": self.array(), "_pinned": None, "_ready": None}


@dataclass(frozen=True)
class JobStarted:
    """The job was prepared and joined the engine; it will run ``steps`` steps."""

    key: Hashable
    steps: int
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class JobStepped:
    """The job finished denoising step ``step`` (1-based) of ``steps``."""

    key: Hashable
    step: int
    steps: int
    #: Set when the job asked for a preview after this step.
    latent: LatentSnapshot | None = None


@dataclass(frozen=True)
class JobFinished:
    """The job's images, decoded (and composited, for inpaint): it left the engine.

    An engine in another process sends ``results`` instead, the images already encoded
    as the job asked, so that the front end only forwards bytes.
    """

    key: Hashable
    images: list[Image.Image]
    results: list[ImageResult] | None = None


@dataclass(frozen=True)
class JobStopped:
    """The job left the engine on the caller's abort, after ``step`` completed steps."""

    key: Hashable
    step: int


@dataclass(frozen=True)
class JobFailed:
    """The job could not go on (it failed alone, or in preparation): it left the engine."""

    key: Hashable
    message: str


EngineEvent = JobStarted | JobStepped | JobFinished | JobStopped | JobFailed


@dataclass(frozen=True)
class StepReport:
    """What one :meth:`EngineCore.step` did: its events, and the UNet calls it made."""

    events: list[EngineEvent]
    #: Rows of each UNet call this step made (more than one after a failed batch split).
    unet_rows: list[int] = field(default_factory=list)
    #: Wall time of the step, seconds.
    seconds: float = 0.0
