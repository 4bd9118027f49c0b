"""Which waiting job the engine takes next, and every job's place in line.

:class:`FairQueue` is the pure, synchronous state (unit-tested on its own): the next job
to start is the oldest waiting job of the session that has gone longest without a job of
its own starting, a session that never had one started going first (PROTOCOL.md section
5.6). From that rule the whole future start order follows: sessions sorted by when they
last had a job started (never first, ties by their oldest waiting job), then taken round
robin, one job each, FIFO within a session.

:class:`Scheduler` is the asyncio face of it: jobs go in, the engine awaits
:meth:`Scheduler.next_job` (or starts jobs with :meth:`Scheduler.start_next` while they
fit; with several models, :meth:`Scheduler.start` takes a job past those waiting for
their model to load, which hear ``queued{loading}``: :meth:`Scheduler.set_loading`),
cancels of waiting jobs take effect at once, and positions are
told to clients as they change: at once, and then at most once per
:data:`QUEUED_MIN_INTERVAL` per job (a change within that interval is sent once, when it
has passed, with the position of that moment).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, Protocol, TypeVar

from latentcast.protocol import Cancelled, Error, ErrorCode, Queued

from .jobs import Job, JobState, StopReason
from .metrics import Metrics

logger = logging.getLogger("latentcast.scheduler")

T = TypeVar("T", bound=Hashable)

QUEUED_MIN_INTERVAL = 0.25
"""Seconds between two ``queued`` messages of one job (PROTOCOL.md section 4).

``queued`` is sent when a job's position changes, at most once per 250 ms per job,
carrying the latest position: a position that changes again within 250 ms is sent once,
when the interval has passed. ``accepted.position`` is not paced.
"""


@dataclass
class _Lane(Generic[T]):
    """One session's waiting items, oldest first, as (age, item)."""

    items: deque[tuple[int, T]] = field(default_factory=deque)
    #: Tick of the last start of one of this session's items; None: never.
    last_start: int | None = None
    #: The item of that start, and the lane's last_start before it (to undo it).
    last_started: T | None = None
    start_before: int | None = None

    def sort_key(self) -> tuple[int, int]:
        # Never-started sessions first (-1 sorts before every tick), then the oldest item.
        return (-1 if self.last_start is None else self.last_start, self.items[0][0])


class FairQueue(Generic[T]):
    """Waiting items grouped by session, in fair start order. No I/O, no clock."""

    def __init__(self) -> None:
        self._lanes: dict[Hashable, _Lane[T]] = {}
        self._where: dict[T, Hashable] = {}
        self._ages = itertools.count()
        self._ticks = itertools.count()

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, item: object) -> bool:
        return item in self._where

    def push(self, item: T, session: Hashable, *, age: int | None = None) -> int:
        """Add ``item`` for ``session``; ``age`` places it as if it had come then.

        Returns the age it was given.
        """
        if item in self._where:
            raise ValueError(f"{item!r} is already waiting")
        if age is None:
            age = next(self._ages)
        lane = self._lanes.setdefault(session, _Lane())
        # Keep each lane sorted by age; an inherited age is older than most, so the
        # insertion point is searched from the left.
        index = len(lane.items)
        while index > 0 and lane.items[index - 1][0] > age:
            index -= 1
        lane.items.insert(index, (age, item))
        self._where[item] = session
        return age

    def age_of(self, item: T) -> int:
        for age, waiting in self._lanes[self._where[item]].items:
            if waiting == item:
                return age
        raise KeyError(item)

    def remove(self, item: T) -> bool:
        """Take ``item`` out of the queue; False when it was not waiting."""
        session = self._where.pop(item, None)
        if session is None:
            return False
        lane = self._lanes[session]
        for entry in lane.items:
            if entry[1] == item:
                lane.items.remove(entry)
                break
        return True

    def peek(self) -> T | None:
        """The next item to start, left waiting; None when nothing waits."""
        lane = self._next_lane()
        return None if lane is None else lane.items[0][1]

    def pop(self) -> T | None:
        """The next item to start, removed; None when nothing waits."""
        item = self.peek()
        if item is None:
            return None
        self.take(item)
        return item

    def take(self, item: T) -> None:
        """Start ``item``, which need not be next (its model is loaded, the ones before it
        wait for theirs): removed, and its session's turn counts as taken.

        Raises:
            KeyError: ``item`` is not waiting.
        """
        session = self._where.pop(item)
        lane = self._lanes[session]
        for entry in lane.items:
            if entry[1] == item:
                lane.items.remove(entry)
                break
        lane.last_started, lane.start_before = item, lane.last_start
        lane.last_start = next(self._ticks)

    def unpop(self, item: T, session: Hashable, age: int) -> None:
        """Undo the start of ``item``: it waits again with its ``age`` and, when it was its
        session's latest start, the session's place in line is what it was before."""
        lane = self._lanes.get(session)
        if lane is not None and lane.last_started == item:
            lane.last_start, lane.last_started = lane.start_before, None
        self.push(item, session, age=age)

    def _next_lane(self) -> _Lane[T] | None:
        lanes = [lane for lane in self._lanes.values() if lane.items]
        return min(lanes, key=_Lane.sort_key) if lanes else None

    def order(self) -> list[T]:
        """Every waiting item in the order they will start if nothing else arrives."""
        lanes = sorted((lane for lane in self._lanes.values() if lane.items), key=_Lane.sort_key)
        return list(_round_robin([lane.items for lane in lanes]))

    def forget(self, session: Hashable) -> None:
        """Drop a session's fairness history once it has nothing waiting and has gone."""
        lane = self._lanes.get(session)
        if lane is not None and not lane.items:
            del self._lanes[session]


def _round_robin(lanes: list[deque[tuple[int, T]]]) -> Iterator[T]:
    iterators = [iter(lane) for lane in lanes]
    while iterators:
        still = []
        for iterator in iterators:
            entry = next(iterator, None)
            if entry is not None:
                yield entry[1]
                still.append(iterator)
        iterators = still


class Cancellable(Protocol):
    def cancel(self) -> None: ...


class Timers(Protocol):
    """What the scheduler needs of an event loop to pace ``queued``; asyncio's loop fits."""

    def time(self) -> float: ...

    def call_later(
        self, delay: float, callback: Callable[..., object], *args: Any
    ) -> Cancellable: ...


@dataclass(eq=False)
class _Pacing:
    """One waiting job's position as the scheduler knows it, and the pacing of ``queued``.

    What the client was last told is ``Job.position`` (``accepted`` or ``queued``).
    """

    #: The job's place in the start order now.
    current: int
    #: Loop time at which its last ``queued`` was handed to the session (-inf: never).
    told_at: float = -math.inf
    #: The deferred send at ``told_at + QUEUED_MIN_INTERVAL``, while one is pending.
    timer: Cancellable | None = None

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Scheduler:
    """The waiting queue of one engine, with cancel, replace and position updates.

    ``timers`` is the clock and timer source for pacing ``queued`` (the running event loop
    when not given; tests pass a fake one).
    """

    def __init__(self, *, max_queue: int, metrics: Metrics, timers: Timers | None = None) -> None:
        self.max_queue = max_queue
        self._metrics = metrics
        self._timers_given = timers
        self._queue: FairQueue[Job] = FairQueue()
        #: Every waiting job's pacing record; a job leaves it when it starts or ends.
        self._pacing: dict[Job, _Pacing] = {}
        self._wakeup = asyncio.Event()
        self._unfinished: set[Job] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        #: Waiting jobs whose model is being loaded (their ``queued`` says ``loading``).
        self._loading: set[Job] = set()

    # ------------------------------------------------------------------ queries

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def unfinished(self) -> frozenset[Job]:
        return frozenset(self._unfinished)

    def has_room(self, *, replacing: Job | None = None) -> bool:
        """Whether one more job fits (a waiting job about to be replaced does not count)."""
        waiting = self.waiting
        if replacing is not None and replacing in self._queue:
            waiting -= 1
        return waiting < self.max_queue

    async def wait_idle(self) -> None:
        """Until no accepted job is unfinished."""
        await self._idle.wait()

    # ------------------------------------------------------------------ commands

    def submit(self, job: Job, *, replacing: Job | None = None) -> int:
        """Queue ``job`` and return its position. ``replacing`` is stopped in the same move.

        A waiting job that is replaced gives the new job its place in line and ends at
        once with ``cancelled{reason:"replaced"}``; a running one stops at its next step.
        """
        age = None
        if replacing is not None and replacing.unfinished:
            if replacing in self._queue:
                age = self._queue.age_of(replacing)
            self._stop(replacing, StopReason.REPLACED)
        job.seq = self._queue.push(job, job.session_id, age=age)
        self._track(job)
        order = self._queue.order()
        # accepted.position: exact and immediate (it is not a paced queued message).
        job.position = order.index(job)
        self._pacing[job] = _Pacing(current=job.position)
        self._publish(order)
        self._wakeup.set()
        return job.position

    def stop(self, job: Job, reason: StopReason) -> None:
        """Stop a job: a waiting one ends now, a running one at its next step boundary.

        The first reason given stands; only the drain deadline (``SHUTDOWN``) also ends a
        running job at once, since the client must hear before the connection closes.
        """
        if self._stop(job, reason):
            self._publish(self._queue.order())

    def _stop(self, job: Job, reason: StopReason) -> bool:
        """:meth:`stop` without telling positions; True when the queue changed."""
        if not job.unfinished:
            return False
        job.request_stop(reason)
        if job in self._queue:
            self._queue.remove(job)
            self._leave_queue(job)
            job.end(stopped_message(job))
            return True
        if reason is StopReason.SHUTDOWN:
            # The engine stops at its next step and its result is dropped: the job ended.
            job.end(shutdown_error(job))
        return False

    def shutdown(self) -> None:
        """The drain deadline: every unfinished job ends now with ``error{shutdown}``.

        Positions are published once, after all of them: a job about to end is not told
        that it moved.
        """
        changed = False
        for job in sorted(self._unfinished, key=lambda job: job.seq):
            changed = self._stop(job, StopReason.SHUTDOWN) or changed
        if changed:
            self._publish(self._queue.order())

    def forget_session(self, session_id: str) -> None:
        self._queue.forget(session_id)

    async def next_job(self) -> Job:
        """The next job to run, marked RUNNING. Waits while nothing waits."""
        await self.wait_for_waiting()
        return self.start_next()

    async def wait_for_change(self) -> None:
        """Until a job is queued (or requeued), or :meth:`wake` is called."""
        self._wakeup.clear()
        await self._wakeup.wait()

    def wake(self) -> None:
        """Wake the engine loops waiting in :meth:`wait_for_change` (a model was loaded)."""
        self._wakeup.set()

    def waiting_in_order(self) -> list[Job]:
        """Every waiting job, in the order they start if each can start when its turn comes."""
        return self._queue.order()

    async def wait_for_waiting(self) -> None:
        """Until a job waits (at once if one does)."""
        while not self.waiting:
            self._wakeup.clear()
            await self._wakeup.wait()

    def peek_next(self) -> Job | None:
        """The job that starts next in fairness order, still waiting; None if none waits."""
        return self._queue.peek()

    def start_next(self) -> Job:
        """Take the job :meth:`peek_next` names out of the queue, marked RUNNING.

        Jobs start only in this order (PROTOCOL.md 5.6: several may run at once, and
        they are admitted to the engine in fairness order): never overtaken.

        Raises:
            LookupError: no job waits.
        """
        job = self._queue.peek()
        if job is None:
            raise LookupError("no job is waiting")
        self.start(job)
        return job

    def start(self, job: Job) -> None:
        """Take ``job`` out of the queue, marked RUNNING, though jobs before it wait: only
        for jobs that wait for their model to be loaded (PROTOCOL.md 5.6 otherwise).

        Raises:
            KeyError: ``job`` is not waiting.
        """
        self._queue.take(job)
        self._leave_queue(job)
        job.state = JobState.RUNNING
        job.started_at = time.monotonic()
        self._metrics.queue_seconds.observe(job.started_at - job.accepted_at)
        self._publish(self._queue.order())

    def set_loading(self, job: Job, loading: bool) -> None:
        """A waiting job's model began (True) or ended (False) loading: said at once, in a
        ``queued`` with the job's position and ``loading``. Nothing for a job not waiting."""
        pacing = self._pacing.get(job)
        if pacing is None or (job in self._loading) == loading:
            return
        if loading:
            self._loading.add(job)
        else:
            self._loading.discard(job)
        pacing.cancel()
        job.position = position = pacing.current
        pacing.told_at = self._timers.time()
        job.owner.send_latest(
            (job.id, "queued"), partial(Queued, id=job.id, position=position, loading=loading)
        )

    def end_waiting(self, job: Job, message: Error) -> None:
        """End a waiting job with ``message`` (its model could not be loaded)."""
        if job not in self._queue:
            return
        self._queue.remove(job)
        self._leave_queue(job)
        job.end(message)
        self._publish(self._queue.order())

    def requeue(self, job: Job) -> None:
        """Put back a job that was started but never reached an engine (the engine was
        lost before it prepared the job): it waits again in its own place (its age), and
        starts on the next engine with room. A job stopped meanwhile ends instead.
        """
        if not job.unfinished:
            return
        if job.stop_requested:
            job.end(stopped_message(job))
            return
        job.state = JobState.QUEUED
        job.started_at = None
        self._queue.unpop(job, job.session_id, job.seq)
        order = self._queue.order()
        self._pacing[job] = _Pacing(current=order.index(job))
        self._publish(order)
        self._wakeup.set()

    # ------------------------------------------------------------------ internals

    def _track(self, job: Job) -> None:
        self._unfinished.add(job)
        self._idle.clear()
        job.on_end(self._forget_job)

    def _forget_job(self, job: Job) -> None:
        self._leave_queue(job)
        self._metrics.jobs.labels(outcome=_OUTCOME_LABELS.get(job.outcome or "", "failed")).inc()
        self._unfinished.discard(job)
        if not self._unfinished:
            self._idle.set()

    def _leave_queue(self, job: Job) -> None:
        """``job`` started or ended: no ``queued`` about it any more, pending or not."""
        self._loading.discard(job)
        pacing = self._pacing.pop(job, None)
        if pacing is not None:
            pacing.cancel()

    @property
    def _timers(self) -> Timers:
        given = self._timers_given
        return given if given is not None else asyncio.get_running_loop()

    def _publish(self, order: list[Job]) -> None:
        """Take note of the start order after a change; tell the jobs that moved, paced.

        One pass over ``order``; only a job whose position changed is touched, and it is
        told at once only when its last ``queued`` is at least QUEUED_MIN_INTERVAL old.
        Otherwise one deferred send is pending for it (see :meth:`_pace`).
        """
        self._metrics.queue_depth.set(len(order))
        now: float | None = None
        pacing_of = self._pacing
        for position, job in enumerate(order):
            pacing = pacing_of[job]
            if pacing.current == position:
                continue
            pacing.current = position
            if now is None:
                now = self._timers.time()
            self._pace(job, pacing, now)

    def _pace(self, job: Job, pacing: _Pacing, now: float) -> None:
        """``job`` moved to ``pacing.current``: tell it now, later, or not at all."""
        if pacing.current == job.position:
            # Back where the client last heard it was: nothing to tell, now or later.
            pacing.cancel()
            return
        due = pacing.told_at + QUEUED_MIN_INTERVAL
        if now >= due:
            pacing.cancel()  # a pending send overtaken by a late-running loop
            self._send_queued(job, pacing, now)
        elif pacing.timer is None:
            pacing.timer = self._timers.call_later(due - now, self._send_deferred, job)

    def _send_deferred(self, job: Job) -> None:
        """The end of ``job``'s interval: tell the position of this moment if it is news."""
        pacing = self._pacing.get(job)
        if pacing is None:  # started or ended (its timer is cancelled then; to be safe)
            return
        pacing.timer = None
        if pacing.current != job.position:
            self._send_queued(job, pacing, self._timers.time())

    def _send_queued(self, job: Job, pacing: _Pacing, now: float) -> None:
        job.position = position = pacing.current
        pacing.told_at = now
        loading = True if job in self._loading else None
        job.owner.send_latest(
            (job.id, "queued"), partial(Queued, id=job.id, position=position, loading=loading)
        )


_OUTCOME_LABELS = {
    "complete": "complete",
    "cancelled": "cancelled",
    ErrorCode.SHUTDOWN.value: "shutdown",
}


def stopped_message(job: Job) -> Cancelled | Error:
    """The terminal message of a job stopped before it finished, from its stop reason.

    ``step`` is the last step the job completed (0 when it never ran).
    """
    reason = job.stop_reason
    if reason is StopReason.SHUTDOWN or reason is None:
        return shutdown_error(job)
    return Cancelled(id=job.id, step=job.step, reason=reason.value)


def shutdown_error(job: Job) -> Error:
    return Error(
        id=job.id,
        code=ErrorCode.SHUTDOWN,
        message="the server stopped before the job could finish",
    )
