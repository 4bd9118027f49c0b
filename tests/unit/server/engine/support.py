"""Helpers for the engine unit tests: requests, the pipeline called directly, and an
:class:`EngineCore` stepped until it is idle, all on the test's own thread."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from latentcast.server.engine import (
    EngineCore,
    EngineEvent,
    JobFailed,
    JobFinished,
    JobSpec,
    JobStarted,
    JobStepped,
    JobStopped,
    StepReport,
    diffusers_arguments,
)
from latentcast.server.images import composite
from latentcast.server.jobs import GenerationRequest
from latentcast.server.models import LoadedModel


def noise_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def square_mask(size: int = 64) -> Image.Image:
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    return Image.fromarray(mask)


#: The fields that make a request of each mode (64x64). img2img and inpaint run
#: int(3 * 0.7) = 2 of a 3-step schedule.
MODES: dict[str, dict[str, Any]] = {
    "txt2img": {},
    "img2img": {"mode": "img2img", "init_image": noise_image(1), "strength": 0.7, "steps": 3},
    "inpaint": {
        "mode": "inpaint",
        "init_image": noise_image(2),
        "mask": square_mask(),
        "strength": 0.7,
        "steps": 3,
    },
}


def make_request(**fields: Any) -> GenerationRequest:
    base: dict[str, Any] = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance_scale": 7.5,
        "seed": 3,
        "scheduler": "euler",
        "num_images": 1,
    }
    base.update(fields)
    return GenerationRequest(**base)


def arrays(images: Iterable[Image.Image]) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in images]


def direct(model: LoadedModel, request: GenerationRequest) -> list[np.ndarray]:
    """The same job from the text prompt, the diffusers pipeline called directly."""
    model.activate_loras(request.loras)
    pipeline: Any = model.pipeline_for(request.mode)
    pipeline.scheduler = model.make_scheduler(request.scheduler)
    images = pipeline(**diffusers_arguments(request)).images
    if request.mode == "inpaint":
        assert request.init_image is not None and request.mask is not None
        images = [composite(image, request.init_image, request.mask) for image in images]
    return arrays(images)


def largest_difference(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    """The largest per-channel difference (0-255) between two jobs' images."""
    assert len(a) == len(b)
    assert all(x.shape == y.shape for x, y in zip(a, b, strict=True))
    return max(
        int(np.abs(x.astype(np.int16) - y.astype(np.int16)).max())
        for x, y in zip(a, b, strict=True)
    )


@dataclass
class Run:
    """What stepping a core until it was idle gave."""

    reports: list[StepReport] = field(default_factory=list)
    #: Every event, the add() ones first, in order.
    events: list[EngineEvent] = field(default_factory=list)

    def of(self, key: Hashable) -> list[EngineEvent]:
        return [event for event in self.events if event.key == key]

    def stepped(self, key: Hashable) -> list[JobStepped]:
        return [e for e in self.of(key) if isinstance(e, JobStepped)]

    def started(self, key: Hashable) -> JobStarted:
        (event,) = [e for e in self.of(key) if isinstance(e, JobStarted)]
        return event

    def end(self, key: Hashable) -> JobFinished | JobStopped | JobFailed:
        ends = [e for e in self.of(key) if isinstance(e, JobFinished | JobStopped | JobFailed)]
        assert len(ends) == 1, ends
        return ends[0]

    def images(self, key: Hashable) -> list[np.ndarray]:
        end = self.end(key)
        assert isinstance(end, JobFinished), end
        return arrays(end.images)

    @property
    def unet_rows(self) -> list[int]:
        return [rows for report in self.reports for rows in report.unet_rows]


def run(
    core: EngineCore,
    requests: Mapping[Any, GenerationRequest],
    *,
    before_step: Callable[[int], list[Hashable]] | None = None,
    max_steps: int = 1000,
) -> Run:
    """Add ``requests`` (in order), then step ``core`` until it is idle.

    ``before_step(n)`` gives the keys to abort with step ``n`` (0-based).
    """
    result = Run()
    for key, request in requests.items():
        result.events += core.add(JobSpec(key, request))
    n = 0
    while core.busy:
        assert n < max_steps, "the core never went idle"
        aborts = before_step(n) if before_step is not None else []
        report = core.step(aborts)
        result.reports.append(report)
        result.events += report.events
        n += 1
    return result


def alone(model: LoadedModel, request: GenerationRequest) -> list[np.ndarray]:
    """The job's images when it runs alone in a fresh core."""
    return run(EngineCore(model, max_batch=8), {"job": request}).images("job")


@contextmanager
def failing_unet(model: LoadedModel, fails: Callable[[int], bool]) -> Iterator[list[int]]:
    """Make the UNet raise for calls of ``rows`` rows where ``fails(rows)``.

    Yields the rows of every call made (failed ones included).
    """
    unet: Any = model.pipeline.unet
    original = unet.forward
    calls: list[int] = []

    def forward(sample: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(sample.shape[0]))
        if fails(int(sample.shape[0])):
            raise RuntimeError(f"simulated failure of a {sample.shape[0]}-row call")
        return original(sample, *args, **kwargs)

    unet.forward = forward
    try:
        yield calls
    finally:
        del unet.forward  # back to the class's method
