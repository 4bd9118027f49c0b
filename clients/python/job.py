"""One job as the client sees it: its state, its bounded event stream and its result.

The client's single reader task feeds every job through ``_deliver`` and never waits on
a consumer: each job buffers its own events with the server's semantics (PROTOCOL.md
section 4 and guarantee 3). A droppable event (``queued``, ``progress``, ``preview``)
replaces the still-unread one of the same type and goes to the back, so a lagging
consumer sees the newest and ``step`` never goes backwards; the others are never dropped.
A job has at most three non-droppable events (accepted, started, terminal) and keeps at
most one unread droppable event per type, so the buffer is bounded by construction.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from latentcast.protocol import (
    DROPPABLE_TYPES,
    TERMINAL_ERROR_CODES,
    Accepted,
    Cancelled,
    Complete,
    Error,
    ImagePreview,
    LatentPreview,
    Progress,
    Queued,
    Started,
    Submit,
    Timings,
)

from .errors import ConnectionLost, JobCancelled, JobFailed, LatentcastError, RequestRejected
from .images import GeneratedImage

logger = logging.getLogger("latentcast.client")

#: Everything a job's stream yields, in the protocol's own types.
JobEvent: TypeAlias = (
    Accepted
    | Queued
    | Started
    | Progress
    | LatentPreview
    | ImagePreview
    | Complete
    | Cancelled
    | Error
)
#: The message that ends a job: exactly one per accepted job.
TerminalEvent: TypeAlias = Complete | Cancelled | Error

JobStatus = Literal[
    "submitting", "rejected", "queued", "running", "complete", "cancelled", "failed", "lost"
]


@dataclass(frozen=True)
class Result:
    """A finished job: its images (in the order of their seeds) and its timings."""

    job_id: str
    images: list[GeneratedImage]
    timings: Timings
    #: The job's ``started`` message (seed, real step count, size, warnings), if it came.
    started: Started | None = None

    @property
    def image(self) -> GeneratedImage:
        """The first (for a one-image job: the only) image."""
        return self.images[0]


class _EventBuffer:
    """A job's unread events: latest-wins for droppable ones, never a lost other one."""

    def __init__(self) -> None:
        self._entries: OrderedDict[int, JobEvent] = OrderedDict()
        self._latest: dict[str, int] = {}
        self._seq = itertools.count()
        self._readable = asyncio.Event()
        self._ended = False
        self._failure: LatentcastError | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, event: JobEvent) -> None:
        """Add an event; a droppable one replaces the unread one of its type."""
        if event.type in DROPPABLE_TYPES:
            previous = self._latest.pop(event.type, None)
            if previous is not None:
                del self._entries[previous]
            seq = next(self._seq)
            self._latest[event.type] = seq
        else:
            seq = next(self._seq)
        self._entries[seq] = event
        self._readable.set()

    def end(self) -> None:
        """Nothing follows: once the buffer is read empty, the stream ends."""
        self._ended = True
        self._readable.set()

    def fail(self, error: LatentcastError) -> None:
        """Once the buffer is read empty, the stream raises ``error``."""
        if not self._ended:
            self._failure = error
            self._readable.set()

    async def get(self) -> JobEvent | None:
        """The oldest unread event; ``None`` at the end of the stream."""
        while not self._entries:
            if self._failure is not None:
                raise self._failure
            if self._ended:
                return None
            self._readable.clear()
            await self._readable.wait()
        seq, event = self._entries.popitem(last=False)
        if self._latest.get(event.type) == seq:
            del self._latest[event.type]
        return event


class Job:
    """A submitted job. Made by :meth:`Client.submit`, which returns it once accepted.

    ``async for event in job`` yields the job's protocol messages from ``accepted`` up to
    and including its terminal one (``complete``, ``cancelled`` or ``error``); it raises
    :class:`ConnectionLost` if the connection ends first. :meth:`result` waits for the
    end without reading the stream, so both can be used on the same job.
    """

    def __init__(self, submit: Submit, send_cancel: Callable[[Job], Awaitable[None]]) -> None:
        self.id: str = submit.id
        #: The submit message as it was sent.
        self.request: Submit = submit
        #: Jobs that will start before this one (from accepted/queued); None once started.
        self.position: int | None = None
        #: The ``started`` message once it came (seed, steps really run, size).
        self.started: Started | None = None
        #: The newest ``progress`` message.
        self.progress: Progress | None = None
        #: The terminal message once it came.
        self.terminal: TerminalEvent | None = None
        self._send_cancel = send_cancel
        self._events = _EventBuffer()
        self._answered = asyncio.Event()
        self._done = asyncio.Event()
        self._rejection: RequestRejected | None = None
        self._lost: ConnectionLost | None = None
        self._accepted = False
        self._cancel_requested = False
        self._reading = False

    def __repr__(self) -> str:
        return f"<Job {self.id!r} {self.status}>"

    # ------------------------------------------------------------------ state

    @property
    def status(self) -> JobStatus:
        """Where the job stands, as far as this client has read."""
        if self._rejection is not None:
            return "rejected"
        if isinstance(self.terminal, Complete):
            return "complete"
        if isinstance(self.terminal, Cancelled):
            return "cancelled"
        if isinstance(self.terminal, Error):
            return "failed"
        if self._lost is not None:
            return "lost"
        if not self._accepted:
            return "submitting"
        return "running" if self.started is not None else "queued"

    @property
    def done(self) -> bool:
        """True once the job has ended (or the connection was lost)."""
        return self._done.is_set()

    @property
    def cancel_requested(self) -> bool:
        """True once :meth:`cancel` has sent a cancel for this job."""
        return self._cancel_requested

    # ------------------------------------------------------------------ use

    async def cancel(self) -> None:
        """Ask the server to cancel the job; returns once the request is sent.

        The job then ends with ``cancelled{reason:"client"}``, or with ``complete`` when
        it finished first. Cancelling a job that has ended, or a second time, does nothing.
        """
        if self.done or self._cancel_requested:
            return
        self._cancel_requested = True
        await self._send_cancel(self)

    async def wait(self) -> TerminalEvent:
        """The job's terminal message, whatever it is; raises ConnectionLost."""
        await self._done.wait()
        if self.terminal is not None:
            return self.terminal
        assert self._lost is not None
        raise self._lost

    async def result(self) -> Result:
        """The images of a completed job.

        Raises :class:`JobCancelled`, :class:`JobFailed` or :class:`ConnectionLost`.
        """
        terminal = await self.wait()
        if isinstance(terminal, Complete):
            return Result(
                job_id=self.id,
                images=[GeneratedImage.from_wire(image) for image in terminal.images],
                timings=terminal.timings,
                started=self.started,
            )
        if isinstance(terminal, Cancelled):
            raise JobCancelled(self.id, terminal.reason, terminal.step)
        raise JobFailed(self.id, terminal.code, terminal.message)

    def __aiter__(self) -> AsyncIterator[JobEvent]:
        return self.events()

    async def events(self) -> AsyncIterator[JobEvent]:
        """The job's events (see the class docstring). One reader at a time."""
        if self._reading:
            raise RuntimeError(f"job {self.id!r} already has a reader of its events")
        self._reading = True
        try:
            while True:
                event = await self._events.get()
                if event is None:
                    return
                yield event
        finally:
            self._reading = False

    # ------------------------------------------------------------------ fed by the client

    async def _wait_answer(self) -> None:
        """Until the submit is answered; raises the rejection or ConnectionLost."""
        await self._answered.wait()
        if self._rejection is not None:
            raise self._rejection
        if not self._accepted:
            assert self._lost is not None
            raise self._lost

    def _deliver(self, message: JobEvent) -> bool:
        """Take one message about this job from the reader; True when the job has ended."""
        if self.done:
            logger.warning("job %s: ignoring %s after its end", self.id, message.type)
            return True
        if not self._answered.is_set():
            return self._deliver_answer(message)
        if isinstance(message, Error) and message.code not in TERMINAL_ERROR_CODES:
            # An answer to a client message about this id (never a submit: those are
            # answered before the job is accepted); not the job's end.
            logger.debug("job %s: %s (%s)", self.id, message.code, message.message)
            return False
        if isinstance(message, Complete | Cancelled | Error):
            self.terminal = message
            self.position = None
            self._events.put(message)
            self._events.end()
            self._done.set()
            return True
        if isinstance(message, Accepted):
            logger.warning("job %s: a second accepted, ignored", self.id)
            return False
        if isinstance(message, Queued):
            self.position = message.position
        elif isinstance(message, Started):
            if self.started is not None:
                logger.warning("job %s: a second started, ignored", self.id)
                return False
            self.started = message
            self.position = None
        elif isinstance(message, Progress):
            self.progress = message
        self._events.put(message)
        return False

    def _deliver_answer(self, message: JobEvent) -> bool:
        if isinstance(message, Accepted):
            self.position = message.position
            self._accepted = True
            self._events.put(message)
            self._answered.set()
            return False
        if isinstance(message, Error):
            self._rejection = RequestRejected(
                message.code, message.message, field=message.field, job_id=self.id
            )
            self._events.fail(self._rejection)
            self._answered.set()
            self._done.set()
            return True
        logger.warning("job %s: ignoring %s before the submit was answered", self.id, message.type)
        return False

    def _connection_lost(self, error: ConnectionLost) -> None:
        """The connection ended before this job did."""
        if self.done:
            return
        self._lost = error
        self._events.fail(error)
        self._answered.set()
        self._done.set()
