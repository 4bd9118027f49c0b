"""A job as the server tracks it, from ``accepted`` to its one terminal message.

A :class:`Job` is created by its session, waits in the scheduler, runs on the engine and
ends exactly once: :meth:`Job.end` is the one place a terminal message is produced, and
it refuses a second call, so a race between a cancel, the engine and the drain deadline
can never send two. The states move only forward::

    QUEUED -> RUNNING -> ENDED
       \\________________/
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from PIL import Image

from latentcast.protocol import GenerationMode, OutputRequest, PreviewRequest
from latentcast.protocol.limits import DEFAULT_STRENGTH

if TYPE_CHECKING:
    from pydantic import BaseModel

logger = logging.getLogger("latentcast.jobs")


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    ENDED = "ended"


class StopReason(enum.Enum):
    """Why a job is being stopped before it finishes."""

    CLIENT = "client"
    REPLACED = "replaced"
    DISCONNECT = "disconnect"
    SHUTDOWN = "shutdown"


@dataclass(frozen=True, eq=False)
class JobControl:
    """One entry of ``params.controls``, its image decoded and made ready to condition on."""

    #: The ControlNet's name (``--controlnet NAME=PATH``).
    name: str
    #: RGB at exactly the job's width x height, already preprocessed (canny, invert).
    image: Image.Image
    scale: float = 1.0
    #: Fractions of the denoising during which the control acts: start <= i/n, (i+1)/n <= end.
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True, eq=False)
class GenerationRequest:
    """A submit's params with every default resolved: what the engine runs."""

    prompt: str
    negative_prompt: str
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    scheduler: str
    num_images: int
    preview: PreviewRequest = field(default_factory=PreviewRequest)
    output: OutputRequest = field(default_factory=OutputRequest)
    mode: GenerationMode = "txt2img"
    #: img2img / inpaint only: the decoded images, already at width x height.
    init_image: Image.Image | None = None
    mask: Image.Image | None = None
    strength: float = DEFAULT_STRENGTH
    #: (adapter name, scale) for this job only.
    loras: tuple[tuple[str, float], ...] = ()
    #: ControlNets steering this job, in the order the client gave them.
    controls: tuple[JobControl, ...] = ()
    #: The model's name (``params.model``); None: the server's default model.
    model: str | None = None

    @property
    def schedule_steps(self) -> int:
        """``num_inference_steps`` for the pipeline.

        img2img and inpaint run ``int(steps * strength)`` of a ``steps``-long schedule;
        when that would be 0 (1 step at strength 0.5, say) the schedule is lengthened just
        enough that one step runs, rather than refusing a request the protocol allows.
        """
        steps = self.steps
        if self.mode != "txt2img":
            while int(steps * self.strength) < 1:
                steps += 1
        return steps

    def wants_preview(self, step: int, steps: int) -> bool:
        """Whether a preview is due after ``step`` of ``steps`` (PROTOCOL.md section 3)."""
        return self.preview.kind != "none" and step < steps and step % self.preview.every == 0


class JobOwner(Protocol):
    """The session side of a job: where its messages go and who hears that it ended."""

    @property
    def session_id(self) -> str: ...

    def send(self, message: BaseModel) -> None: ...

    def send_latest(self, key: tuple[str, str], build: Callable[[], BaseModel]) -> None: ...

    def job_ended(self, job: Job) -> None: ...


@dataclass(eq=False)
class Job:
    """One accepted job. Identity is the object: ids are only unique per session."""

    id: str
    owner: JobOwner
    request: GenerationRequest
    #: Age in the queue; a job that replaces a queued one inherits that one's age.
    seq: int = 0
    state: JobState = JobState.QUEUED
    #: Last position told to the client (accepted or queued).
    position: int = -1
    accepted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    steps: int = 0
    step: int = 0
    stop_reason: StopReason | None = None
    #: How the job ended: "complete", "cancelled" or the error code; None while unfinished.
    outcome: str | None = None
    _ended_callbacks: list[Callable[[Job], None]] = field(default_factory=list)

    @property
    def session_id(self) -> str:
        return self.owner.session_id

    @property
    def unfinished(self) -> bool:
        return self.state is not JobState.ENDED

    def __repr__(self) -> str:
        return f"<Job {self.session_id}/{self.id} {self.state.value}>"

    @property
    def stop_requested(self) -> bool:
        """A stop was asked for, or the job ended: the engine drops it at its next step."""
        return self.stop_reason is not None or self.state is JobState.ENDED

    def request_stop(self, reason: StopReason) -> bool:
        """Ask the job to stop; False when it already ended or a stop was already asked."""
        if self.state is JobState.ENDED or self.stop_reason is not None:
            return False
        self.stop_reason = reason
        return True

    def on_end(self, callback: Callable[[Job], None]) -> None:
        self._ended_callbacks.append(callback)

    def end(self, message: BaseModel) -> bool:
        """Send the job's terminal message, once. Returns False if it had already ended."""
        if self.state is JobState.ENDED:
            return False
        self.state = JobState.ENDED
        self.outcome = str(getattr(message, "code", None) or getattr(message, "type", "?"))
        logger.info("session=%s job=%s ended: %s", self.session_id, self.id, self.outcome)
        self.owner.send(message)
        self.owner.job_ended(self)
        for callback in self._ended_callbacks:
            callback(self)
        return True
