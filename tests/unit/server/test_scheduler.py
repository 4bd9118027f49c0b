"""Unit tests for latentcast.server.scheduler: FairQueue (pure) and the asyncio Scheduler."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from latentcast.protocol import Cancelled, Complete, Error, Queued, Timings
from latentcast.server.jobs import GenerationRequest, Job, JobState, StopReason
from latentcast.server.metrics import Metrics
from latentcast.server.scheduler import QUEUED_MIN_INTERVAL, FairQueue, Scheduler

# =========================================================================== FairQueue


def drain(queue: FairQueue[str]) -> list[str]:
    popped: list[str] = []
    while (item := queue.pop()) is not None:
        popped.append(item)
    return popped


def test_empty_queue() -> None:
    queue: FairQueue[str] = FairQueue()
    assert len(queue) == 0
    assert queue.pop() is None
    assert queue.order() == []
    assert "x" not in queue
    assert queue.remove("x") is False


def test_fifo_within_one_session() -> None:
    queue: FairQueue[str] = FairQueue()
    for item in ("a1", "a2", "a3", "a4"):
        queue.push(item, "A")
    assert queue.order() == ["a1", "a2", "a3", "a4"]
    assert drain(queue) == ["a1", "a2", "a3", "a4"]
    assert len(queue) == 0


def test_backlog_cannot_starve_other_sessions() -> None:
    queue: FairQueue[str] = FairQueue()
    for n in range(50):
        queue.push(f"a{n}", "A")
    assert queue.pop() == "a0"
    queue.push("b0", "B")
    queue.push("b1", "B")
    # B never had a job started: it goes first, then the sessions alternate.
    assert queue.order()[:5] == ["b0", "a1", "b1", "a2", "a3"]
    assert queue.pop() == "b0"
    assert queue.pop() == "a1"
    queue.push("c0", "C")
    assert queue.pop() == "c0"
    assert queue.pop() == "b1"
    assert queue.pop() == "a2"
    assert drain(queue) == [f"a{n}" for n in range(3, 50)]


def test_never_started_sessions_go_first() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a0", "A")
    queue.push("a1", "A")
    assert queue.pop() == "a0"
    queue.push("b0", "B")  # newer than a1, but B never had a start
    assert queue.order() == ["b0", "a1"]
    assert queue.pop() == "b0"
    assert queue.pop() == "a1"


def test_never_started_sessions_are_ordered_by_their_oldest_job() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("b0", "B")
    queue.push("a0", "A")
    queue.push("b1", "B")
    queue.push("c0", "C")
    assert queue.order() == ["b0", "a0", "c0", "b1"]
    assert drain(queue) == ["b0", "a0", "c0", "b1"]


def test_longest_without_a_start_goes_next() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a0", "A")
    queue.push("b0", "B")
    queue.push("c0", "C")
    assert drain(queue) == ["a0", "b0", "c0"]
    # Every session has had a start now: A's was longest ago, then B's, then C's,
    # whatever the order of the new submits.
    queue.push("c1", "C")
    queue.push("b1", "B")
    queue.push("a1", "A")
    queue.push("c2", "C")
    assert queue.order() == ["a1", "b1", "c1", "c2"]
    assert drain(queue) == ["a1", "b1", "c1", "c2"]


def test_push_with_age_inherits_a_place() -> None:
    queue: FairQueue[str] = FairQueue()
    ages = [queue.push(item, "A") for item in ("a0", "a1", "a2")]
    assert ages == sorted(ages) and len(set(ages)) == 3
    queue.push("b0", "B")
    age = queue.age_of("a1")
    assert age == ages[1]
    assert queue.remove("a1") is True
    assert queue.push("x", "A", age=age) == age
    assert queue.age_of("x") == age
    assert queue.order() == ["a0", "b0", "x", "a2"]
    assert drain(queue) == ["a0", "b0", "x", "a2"]


def test_inherited_age_can_put_a_session_first() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a0", "A")
    queue.push("b0", "B")
    old = queue.age_of("a0")
    queue.remove("a0")
    assert queue.order() == ["b0"]
    queue.push("a-new", "A", age=old)
    assert queue.order() == ["a-new", "b0"]


def test_remove() -> None:
    queue: FairQueue[str] = FairQueue()
    for item in ("a0", "a1", "a2"):
        queue.push(item, "A")
    queue.push("b0", "B")
    assert queue.remove("a1") is True
    assert "a1" not in queue
    assert len(queue) == 3
    assert queue.remove("a1") is False
    assert queue.remove("never") is False
    assert queue.order() == ["a0", "b0", "a2"]
    with pytest.raises(KeyError):
        queue.age_of("a1")
    # A removed item may be pushed again.
    queue.push("a1", "A")
    assert drain(queue) == ["a0", "b0", "a2", "a1"]


def test_removing_every_item_of_a_session_keeps_its_history() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a0", "A")
    queue.push("b0", "B")
    assert queue.pop() == "a0"  # A started at tick 0
    assert queue.pop() == "b0"  # B at tick 1
    queue.push("a1", "A")
    queue.remove("a1")
    queue.push("b1", "B")
    queue.push("a2", "A")
    assert queue.order() == ["a2", "b1"]  # A's start is older than B's


def test_forget_drops_history_only_when_nothing_waits() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("a0", "A")
    queue.push("b0", "B")
    assert drain(queue) == ["a0", "b0"]
    queue.forget("B")
    queue.push("a1", "A")
    queue.push("b1", "B")  # B counts as never started again
    assert queue.order() == ["b1", "a1"]

    queue.forget("A")  # has a waiting item: nothing is forgotten
    assert queue.order() == ["b1", "a1"]
    assert queue.pop() == "b1"
    assert queue.pop() == "a1"
    queue.forget("nobody")  # unknown sessions are fine


def test_take_starts_an_item_that_is_not_next_and_counts_as_its_sessions_turn() -> None:
    queue: FairQueue[str] = FairQueue()
    for session, item in (("A", "a1"), ("A", "a2"), ("B", "b1"), ("C", "c1")):
        queue.push(item, session)
    queue.take("a2")  # a1 waits (for its model, say)
    assert "a2" not in queue
    # A has had a start now: the never-started sessions go first, then A's a1.
    assert queue.order() == ["b1", "c1", "a1"]
    with pytest.raises(KeyError):
        queue.take("a2")


def test_duplicate_push_raises() -> None:
    queue: FairQueue[str] = FairQueue()
    queue.push("x", "A")
    with pytest.raises(ValueError, match="already waiting"):
        queue.push("x", "A")
    with pytest.raises(ValueError, match="already waiting"):
        queue.push("x", "B", age=0)
    assert len(queue) == 1
    assert queue.order() == ["x"]
    assert queue.pop() == "x"
    queue.push("x", "A")  # fine once it is no longer waiting
    assert queue.order() == ["x"]


# --------------------------------------------------------------------------- property


class ReferenceQueue:
    """PROTOCOL.md 5.6 written down directly, to check FairQueue against."""

    def __init__(self) -> None:
        self.waiting: dict[str, tuple[str, int, int]] = {}  # item -> (session, age, arrival)
        self.last_start: dict[str, int] = {}
        self.ages = itertools.count()
        self.ticks = itertools.count()
        self.arrivals = itertools.count()

    def push(self, item: str, session: str, age: int | None = None) -> int:
        if age is None:
            age = next(self.ages)
        self.waiting[item] = (session, age, next(self.arrivals))
        return age

    def remove(self, item: str) -> bool:
        return self.waiting.pop(item, None) is not None

    def forget(self, session: str) -> None:
        if not any(s == session for s, _, _ in self.waiting.values()):
            self.last_start.pop(session, None)

    def pop(self) -> str | None:
        if not self.waiting:
            return None

        def oldest(session: str) -> tuple[int, int]:
            return min((age, arrival) for s, age, arrival in self.waiting.values() if s == session)

        sessions = {session for session, _, _ in self.waiting.values()}
        # Longest without a start (never: first), ties by the oldest waiting job.
        session = min(sessions, key=lambda s: (self.last_start.get(s, -1), oldest(s)))
        age, arrival = oldest(session)
        item = next(
            item for item, entry in self.waiting.items() if entry == (session, age, arrival)
        )
        del self.waiting[item]
        self.last_start[session] = next(self.ticks)
        return item

    def predicted_order(self) -> list[str]:
        clone = ReferenceQueue()
        clone.waiting = dict(self.waiting)
        clone.last_start = dict(self.last_start)
        clone.ticks = itertools.count(10**9)
        return [item for item in iter(clone.pop, None)]


SESSIONS = ("A", "B", "C", "D")

operations = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.sampled_from(SESSIONS)),
        st.tuples(st.just("push"), st.sampled_from(SESSIONS)),
        st.tuples(st.just("pop"), st.just("")),
        st.tuples(st.just("remove"), st.integers(0, 30).map(str)),
        st.tuples(st.just("replace"), st.integers(0, 30).map(str)),
        st.tuples(st.just("forget"), st.sampled_from(SESSIONS)),
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_order_predicts_pops_and_matches_the_fairness_rule(ops: list[tuple[str, str]]) -> None:
    queue: FairQueue[str] = FairQueue()
    reference = ReferenceQueue()
    names = (f"j{n}" for n in itertools.count())
    for op, arg in ops:
        if op == "push":
            item = next(names)
            assert queue.push(item, arg) == reference.push(item, arg)
        elif op == "pop":
            expected = queue.order()[:1]
            popped = queue.pop()
            assert popped == reference.pop()
            assert [popped] == expected or (popped is None and expected == [])
        elif op == "remove":
            item = f"j{arg}"
            assert queue.remove(item) is reference.remove(item)
        elif op == "replace":
            # What the Scheduler does for a replaced waiting job: same session, same age.
            old = f"j{arg}"
            if old in queue:
                session, age, _ = reference.waiting[old]
                assert queue.age_of(old) == age
                queue.remove(old)
                reference.remove(old)
                new = next(names)
                assert queue.push(new, session, age=age) == reference.push(new, session, age)
        else:
            queue.forget(arg)
            reference.forget(arg)
        assert len(queue) == len(reference.waiting)
        assert queue.order() == reference.predicted_order()
    order = queue.order()
    assert sorted(order) == sorted(reference.waiting)
    assert drain(queue) == order


# =========================================================================== Scheduler


@dataclass(eq=False)
class Owner:
    """A real JobOwner that records what it is told, with the session's coalescing."""

    session_id: str
    sent: list[BaseModel] = field(default_factory=list)
    ended: list[Job] = field(default_factory=list)

    def send(self, message: BaseModel) -> None:
        self.sent.append(message)

    def send_latest(self, key: tuple[str, str], build: Callable[[], BaseModel]) -> None:
        message = build()
        assert key == (getattr(message, "id", None), getattr(message, "type", None))
        self.sent.append(message)

    def job_ended(self, job: Job) -> None:
        self.ended.append(job)

    def take(self) -> list[BaseModel]:
        sent, self.sent = self.sent, []
        return sent


def make_job(owner: Owner, job_id: str) -> Job:
    request = GenerationRequest(
        prompt="a cat",
        negative_prompt="",
        width=64,
        height=64,
        steps=2,
        guidance_scale=1.0,
        seed=1,
        scheduler="euler",
        num_images=1,
    )
    return Job(id=job_id, owner=owner, request=request)


class FakeTimer:
    def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]):
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTimers:
    """The scheduler's clock and call_later, moved by hand: time passes only in advance()."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._heap: list[tuple[float, int, FakeTimer]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> FakeTimer:
        timer = FakeTimer(self.now + delay, callback, args)
        heapq.heappush(self._heap, (timer.when, next(self._order), timer))
        return timer

    @property
    def pending(self) -> list[FakeTimer]:
        return [timer for _, _, timer in sorted(self._heap) if not timer.cancelled]

    def advance(self, seconds: float) -> None:
        """Move the clock on, running every timer that falls due, each at its own time.

        Like asyncio, a timer within the clock's resolution of now counts as due (so that
        0.05 + 0.2 reaches a timer set 0.25 ahead).
        """
        until = self.now + seconds
        while self._heap and self._heap[0][0] <= until + 1e-9:
            when, _, timer = heapq.heappop(self._heap)
            if timer.cancelled:
                continue
            self.now = max(self.now, when)
            timer.callback(*timer.args)
        self.now = until


@dataclass
class Setup:
    scheduler: Scheduler
    metrics: Metrics
    owners: dict[str, Owner]
    timers: FakeTimers

    def job(self, session: str, job_id: str) -> Job:
        owner = self.owners.setdefault(session, Owner(session))
        return make_job(owner, job_id)

    def submit(self, session: str, job_id: str, replacing: Job | None = None) -> Job:
        job = self.job(session, job_id)
        position = self.scheduler.submit(job, replacing=replacing)
        assert position == job.position
        return job

    def outcome_count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "latentcast_jobs_total", {"outcome": outcome}
        )
        assert value is not None
        return value


def make_setup(max_queue: int = 4) -> Setup:
    metrics = Metrics()
    timers = FakeTimers()
    return Setup(
        Scheduler(max_queue=max_queue, metrics=metrics, timers=timers), metrics, {}, timers
    )


@pytest.fixture
def setup() -> Iterator[Setup]:
    yield make_setup()


async def test_submit_returns_positions_in_fair_order(setup: Setup) -> None:
    a1 = setup.submit("A", "a1")
    a2 = setup.submit("A", "a2")
    a3 = setup.submit("A", "a3")
    assert (a1.position, a2.position, a3.position) == (0, 1, 2)
    assert setup.owners["A"].take() == []  # nothing moved; a new job hears only accepted
    b1 = setup.submit("B", "b1")
    assert b1.position == 1
    assert setup.owners["B"].take() == []  # not even a queued for its own position
    assert setup.owners["A"].take() == [Queued(id="a2", position=2), Queued(id="a3", position=3)]
    assert setup.scheduler.waiting == 4
    assert setup.scheduler.unfinished == {a1, a2, a3, b1}
    assert all(job.state is JobState.QUEUED for job in (a1, a2, a3, b1))


async def test_queued_sent_only_when_a_position_changes(setup: Setup) -> None:
    setup.submit("A", "a1")
    setup.submit("B", "b1")
    setup.submit("A", "a2")  # a1, b1, a2: nobody moves
    assert setup.owners["A"].take() == []
    assert setup.owners["B"].take() == []
    setup.submit("C", "c1")  # a1, b1, c1, a2
    assert setup.owners["A"].take() == [Queued(id="a2", position=3)]
    assert setup.owners["B"].take() == []
    assert setup.owners["C"].take() == []


async def test_next_job_is_fair_and_updates_positions(setup: Setup) -> None:
    a1, a2, a3 = (setup.submit("A", name) for name in ("a1", "a2", "a3"))
    b1 = setup.submit("B", "b1")
    setup.owners["A"].take()

    first = await setup.scheduler.next_job()
    assert first is a1
    assert a1.state is JobState.RUNNING
    assert a1.started_at is not None and a1.started_at >= a1.accepted_at
    assert a1.unfinished
    assert setup.scheduler.waiting == 3
    assert setup.owners["B"].take() == [Queued(id="b1", position=0)]
    # a2 and a3 were told of b1's arrival just now: their next queued waits its interval.
    assert setup.owners["A"].take() == []
    setup.timers.advance(QUEUED_MIN_INTERVAL)
    assert setup.owners["A"].take() == [Queued(id="a2", position=1), Queued(id="a3", position=2)]

    assert [await setup.scheduler.next_job() for _ in range(3)] == [b1, a2, a3]
    assert setup.scheduler.waiting == 0
    assert setup.metrics.registry.get_sample_value("latentcast_queue_depth") == 0


async def test_next_job_waits_for_a_submit(setup: Setup) -> None:
    task = asyncio.create_task(setup.scheduler.next_job())
    await asyncio.sleep(0.01)
    assert not task.done()
    job = setup.submit("A", "a1")
    assert await asyncio.wait_for(task, 1.0) is job
    assert job.state is JobState.RUNNING


async def test_stop_of_a_waiting_job_ends_it_at_once(setup: Setup) -> None:
    a1 = setup.submit("A", "a1")
    a2 = setup.submit("A", "a2")
    setup.scheduler.stop(a1, StopReason.CLIENT)
    assert not a1.unfinished
    assert a1.outcome == "cancelled"
    assert setup.owners["A"].take() == [
        Cancelled(id="a1", step=0, reason="client"),
        Queued(id="a2", position=0),
    ]
    assert setup.owners["A"].ended == [a1]
    assert setup.scheduler.waiting == 1
    assert setup.scheduler.unfinished == {a2}
    assert setup.outcome_count("cancelled") == 1
    # Stopping again changes nothing and sends nothing.
    setup.scheduler.stop(a1, StopReason.DISCONNECT)
    assert setup.owners["A"].take() == []
    assert setup.owners["A"].ended == [a1]
    assert await setup.scheduler.next_job() is a2


async def test_disconnect_stop_of_a_waiting_job(setup: Setup) -> None:
    a1 = setup.submit("A", "a1")
    setup.scheduler.stop(a1, StopReason.DISCONNECT)
    assert setup.owners["A"].take() == [Cancelled(id="a1", step=0, reason="disconnect")]


async def test_stop_of_a_running_job_waits_for_the_engine(setup: Setup) -> None:
    a1 = setup.submit("A", "a1")
    assert await setup.scheduler.next_job() is a1
    setup.scheduler.stop(a1, StopReason.CLIENT)
    assert a1.unfinished
    assert a1.stop_requested
    assert a1.stop_reason is StopReason.CLIENT
    assert setup.owners["A"].take() == []
    # The first reason stands.
    setup.scheduler.stop(a1, StopReason.REPLACED)
    assert a1.stop_reason is StopReason.CLIENT
    assert a1.unfinished
    # ...except that the drain deadline ends a running job at once.
    setup.scheduler.stop(a1, StopReason.SHUTDOWN)
    assert not a1.unfinished
    [message] = setup.owners["A"].take()
    assert isinstance(message, Error)
    assert (message.id, message.code) == ("a1", "shutdown")
    assert setup.scheduler.unfinished == frozenset()


async def test_a_requeued_job_waits_again_in_its_own_place(setup: Setup) -> None:
    """An engine lost before it prepared the job: the job goes back where it was."""
    a1, a2 = setup.submit("A", "a1"), setup.submit("A", "a2")
    b1 = setup.submit("B", "b1")
    assert await setup.scheduler.next_job() is a1
    setup.owners["A"].take()
    setup.owners["B"].take()
    setup.scheduler.requeue(a1)
    assert a1.state is JobState.QUEUED and a1.started_at is None and a1.unfinished
    assert setup.scheduler.waiting == 3
    # Its client never heard it start: still first, nothing to tell. b1 is second again.
    assert setup.owners["A"].take() == []
    setup.timers.advance(QUEUED_MIN_INTERVAL)
    assert setup.owners["B"].take() == [Queued(id="b1", position=1)]
    # In its place again: before b1 (A's start is undone) and before a2 (its age).
    assert [await setup.scheduler.next_job() for _ in range(3)] == [a1, b1, a2]


async def test_a_requeued_job_that_was_stopped_ends_instead(setup: Setup) -> None:
    a1 = setup.submit("A", "a1")
    assert await setup.scheduler.next_job() is a1
    setup.scheduler.stop(a1, StopReason.CLIENT)
    setup.owners["A"].take()
    setup.scheduler.requeue(a1)
    assert not a1.unfinished and setup.scheduler.waiting == 0
    assert setup.owners["A"].take() == [Cancelled(id="a1", step=0, reason="client")]
    setup.scheduler.requeue(a1)  # an ended job: nothing
    assert setup.owners["A"].take() == [] and setup.scheduler.waiting == 0


async def test_replacing_a_waiting_job_takes_its_place(setup: Setup) -> None:
    a1 = setup.submit("A", "a1")
    a2 = setup.submit("A", "a2")
    b1 = setup.submit("B", "b1")  # a1, b1, a2
    setup.owners["A"].take()
    a3 = setup.submit("A", "a3", replacing=a1)
    assert a3.position == 0
    assert not a1.unfinished
    assert setup.owners["A"].take() == [Cancelled(id="a1", step=0, reason="replaced")]
    assert setup.owners["B"].take() == []  # b1 did not move
    assert setup.scheduler.waiting == 3
    assert setup.scheduler.unfinished == {a2, a3, b1}
    a4 = setup.submit("A", "a4", replacing=a2)
    assert a4.position == 2
    assert setup.owners["A"].take() == [Cancelled(id="a2", step=0, reason="replaced")]
    assert [await setup.scheduler.next_job() for _ in range(3)] == [a3, b1, a4]


async def test_replacing_a_running_job_stops_it_at_the_next_step(setup: Setup) -> None:
    a1 = setup.submit("A", "a1")
    assert await setup.scheduler.next_job() is a1
    b1 = setup.submit("B", "b1")
    a2 = setup.submit("A", "a2", replacing=a1)
    assert a1.unfinished
    assert a1.stop_reason is StopReason.REPLACED
    assert a1.stop_requested
    assert a2.position == 1  # b1 first: A has had a start, B has not
    assert setup.owners["A"].take() == []
    assert await setup.scheduler.next_job() is b1
    assert await setup.scheduler.next_job() is a2


async def test_replacing_an_ended_job_is_a_plain_submit(setup: Setup) -> None:
    a1 = setup.submit("A", "a1")
    setup.scheduler.stop(a1, StopReason.CLIENT)
    setup.owners["A"].take()
    b1 = setup.submit("B", "b1")
    a2 = setup.submit("A", "a2", replacing=a1)
    assert a2.position == 1
    assert b1.position == 0
    assert setup.owners["A"].take() == []
    assert setup.owners["A"].ended == [a1]


async def test_has_room(setup: Setup) -> None:
    jobs = [setup.submit("A", f"a{n}") for n in range(4)]
    assert not setup.scheduler.has_room()
    assert setup.scheduler.has_room(replacing=jobs[2])
    running = await setup.scheduler.next_job()
    assert setup.scheduler.has_room()
    setup.submit("A", "a4")
    assert not setup.scheduler.has_room(replacing=running)  # a running job frees no slot


async def test_shutdown_ends_every_unfinished_job(setup: Setup) -> None:
    a1 = setup.submit("A", "a1")
    a2 = setup.submit("A", "a2")
    b1 = setup.submit("B", "b1")
    assert await setup.scheduler.next_job() is a1
    setup.scheduler.stop(a1, StopReason.CLIENT)  # a running job already being cancelled
    setup.owners["A"].take()
    setup.owners["B"].take()

    idle = asyncio.create_task(setup.scheduler.wait_idle())
    await asyncio.sleep(0)
    assert not idle.done()

    setup.scheduler.shutdown()
    await asyncio.wait_for(idle, 1.0)
    for job in (a1, a2, b1):
        assert not job.unfinished
        assert job.outcome == "shutdown"
    errors_a = [m for m in setup.owners["A"].take() if isinstance(m, Error)]
    errors_b = [m for m in setup.owners["B"].take() if isinstance(m, Error)]
    assert [(e.id, e.code, e.field) for e in errors_a] == [
        ("a1", "shutdown", None),
        ("a2", "shutdown", None),
    ]
    assert [(e.id, e.code) for e in errors_b] == [("b1", "shutdown")]
    assert setup.scheduler.unfinished == frozenset()
    assert setup.scheduler.waiting == 0
    assert setup.outcome_count("shutdown") == 3
    # Nothing more about an ended job, even if shutdown comes twice.
    setup.scheduler.shutdown()
    assert setup.owners["A"].take() == [] and setup.owners["B"].take() == []


async def test_wait_idle(setup: Setup) -> None:
    await asyncio.wait_for(setup.scheduler.wait_idle(), 1.0)  # idle from the start
    a1 = setup.submit("A", "a1")
    waiter = asyncio.create_task(setup.scheduler.wait_idle())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    assert await setup.scheduler.next_job() is a1
    await asyncio.sleep(0.01)
    assert not waiter.done()  # running is not idle
    a1.end(Complete(id="a1", images=[], timings=Timings(queued_ms=0, run_ms=1)))
    await asyncio.wait_for(waiter, 1.0)
    assert setup.scheduler.unfinished == frozenset()
    assert setup.outcome_count("complete") == 1
    assert setup.owners["A"].ended == [a1]


async def test_forget_session(setup: Setup) -> None:
    setup.submit("A", "a1")
    setup.submit("B", "b1")
    assert await setup.scheduler.next_job() is not None
    assert await setup.scheduler.next_job() is not None
    setup.scheduler.forget_session("B")  # B leaves; when it comes back it is new again
    a2 = setup.submit("A", "a2")
    b2 = setup.submit("B", "b2")
    assert (b2.position, a2.position) == (0, 1)


async def test_job_ids_are_per_session(setup: Setup) -> None:
    a = setup.submit("A", "same")
    b = setup.submit("B", "same")
    assert (a.position, b.position) == (0, 1)
    setup.scheduler.stop(a, StopReason.CLIENT)
    assert b.unfinished
    assert setup.owners["B"].take() == [Queued(id="same", position=0)]
    assert setup.owners["A"].take() == [Cancelled(id="same", step=0, reason="client")]


# --------------------------------------------------------------------------- queued pacing


def queued(owner: Owner) -> list[tuple[str, int]]:
    """The (id, position) of every queued the owner got since the last take."""
    return [(m.id, m.position) for m in owner.take() if isinstance(m, Queued)]


async def test_the_first_change_is_sent_at_once() -> None:
    setup = make_setup(max_queue=10)
    jobs = [setup.submit("A", f"a{n}") for n in range(4)]
    setup.timers.advance(3600.0)  # however long they have waited, accepted is not a queued
    setup.scheduler.stop(jobs[0], StopReason.CLIENT)
    assert setup.owners["A"].take() == [
        Cancelled(id="a0", step=0, reason="client"),
        Queued(id="a1", position=0),
        Queued(id="a2", position=1),
        Queued(id="a3", position=2),
    ]
    assert setup.timers.pending == []
    # accepted.position is exact and immediate even while the others are being paced.
    a4 = setup.submit("A", "a4")
    assert a4.position == 3


async def test_changes_within_the_interval_coalesce_into_one_with_the_latest_position() -> None:
    setup = make_setup(max_queue=10)
    jobs = [setup.submit("A", f"a{n}") for n in range(10)]
    owner = setup.owners["A"]
    setup.scheduler.stop(jobs[0], StopReason.CLIENT)
    assert queued(owner) == [(f"a{n}", n - 1) for n in range(1, 10)]
    for n in (1, 2, 3):  # three more moves within 250 ms of that
        setup.timers.advance(0.05)
        setup.scheduler.stop(jobs[n], StopReason.CLIENT)
        assert queued(owner) == []
    # One timer per job, not one per change.
    assert len(setup.timers.pending) == 6
    setup.timers.advance(QUEUED_MIN_INTERVAL - 0.15 - 0.001)
    assert queued(owner) == []
    setup.timers.advance(0.001)  # the interval since a4..a9 were told has passed
    assert queued(owner) == [(f"a{n}", n - 4) for n in range(4, 10)]
    assert [job.position for job in jobs[4:]] == [0, 1, 2, 3, 4, 5]
    assert setup.timers.pending == []
    setup.timers.advance(10.0)
    assert queued(owner) == []


async def test_a_change_after_a_deferred_send_waits_for_the_next_interval() -> None:
    setup = make_setup(max_queue=10)
    jobs = [setup.submit("A", f"a{n}") for n in range(5)]
    owner = setup.owners["A"]
    setup.scheduler.stop(jobs[0], StopReason.CLIENT)  # t=0: told at once
    assert queued(owner) == [("a1", 0), ("a2", 1), ("a3", 2), ("a4", 3)]
    setup.timers.advance(0.1)
    setup.scheduler.stop(jobs[1], StopReason.CLIENT)  # t=0.1: deferred to t=0.25
    setup.timers.advance(0.15)
    assert queued(owner) == [("a2", 0), ("a3", 1), ("a4", 2)]
    setup.timers.advance(0.1)
    setup.scheduler.stop(jobs[2], StopReason.CLIENT)  # t=0.35: within 0.25 of t=0.25
    assert queued(owner) == []
    setup.timers.advance(0.149)
    assert queued(owner) == []
    setup.timers.advance(0.001)  # t=0.5
    assert queued(owner) == [("a3", 0), ("a4", 1)]


async def test_no_queued_when_the_position_returns_to_what_was_told() -> None:
    setup = make_setup(max_queue=10)
    a1 = setup.submit("A", "a1")
    assert await setup.scheduler.next_job() is a1  # A has had a start now
    a2 = setup.submit("A", "a2")
    a3 = setup.submit("A", "a3")
    setup.scheduler.stop(a2, StopReason.CLIENT)
    assert queued(setup.owners["A"]) == [("a3", 0)]
    setup.timers.advance(0.05)
    b1 = setup.submit("B", "b1")  # B never had a start: it goes first, a3 grows to 1
    assert b1.position == 0
    assert queued(setup.owners["A"]) == []
    assert len(setup.timers.pending) == 1
    setup.timers.advance(0.05)
    setup.scheduler.stop(b1, StopReason.CLIENT)  # a3 is back at 0, what it was told
    assert setup.timers.pending == []
    setup.timers.advance(1.0)
    assert queued(setup.owners["A"]) == []
    assert a3.position == 0


async def test_the_latest_position_is_sent_even_if_an_earlier_change_equalled_it() -> None:
    # told 2, then 1 (deferred), then 2 (back: nothing pending), then 1 again: sent at the
    # end of the interval.
    setup = make_setup(max_queue=10)
    a1 = setup.submit("A", "a1")
    assert await setup.scheduler.next_job() is a1
    a2, a3 = setup.submit("A", "a2"), setup.submit("A", "a3")
    b1 = setup.submit("B", "b1")  # b1, a2, a3: a2 1, a3 2, told at once
    assert queued(setup.owners["A"]) == [("a2", 1), ("a3", 2)]
    setup.timers.advance(0.05)
    setup.scheduler.stop(b1, StopReason.CLIENT)  # a2 0, a3 1: deferred
    setup.submit("C", "c1")  # c1 first: a2 1, a3 2, as told: nothing pending
    assert setup.timers.pending == []
    setup.scheduler.stop(a2, StopReason.CLIENT)  # a3 1: deferred again
    setup.timers.advance(0.2)
    assert queued(setup.owners["A"]) == [("a3", 1)]
    assert a3.position == 1


async def test_no_queued_after_a_job_started_or_ended() -> None:
    setup = make_setup(max_queue=10)
    jobs = [setup.submit("A", f"a{n}") for n in range(4)]
    owner = setup.owners["A"]
    setup.scheduler.stop(jobs[0], StopReason.CLIENT)
    owner.take()
    setup.timers.advance(0.05)
    setup.scheduler.stop(jobs[1], StopReason.CLIENT)  # a2 and a3 move: deferred
    assert len(setup.timers.pending) == 2
    assert await setup.scheduler.next_job() is jobs[2]  # a2 starts: its timer goes
    assert len(setup.timers.pending) == 1
    setup.scheduler.stop(jobs[3], StopReason.CLIENT)  # a3 ends: its timer goes
    assert setup.timers.pending == []
    setup.timers.advance(1.0)
    assert owner.take() == [
        Cancelled(id="a1", step=0, reason="client"),
        Cancelled(id="a3", step=0, reason="client"),
    ]


async def test_shutdown_cancels_pending_sends_and_tells_no_positions() -> None:
    setup = make_setup(max_queue=10)
    jobs = [setup.submit(session, f"{session}{n}") for n in range(3) for session in "AB"]
    setup.scheduler.stop(jobs[0], StopReason.CLIENT)
    setup.timers.advance(0.05)
    setup.scheduler.stop(jobs[1], StopReason.CLIENT)
    assert setup.timers.pending != []
    for owner in setup.owners.values():
        owner.take()
    setup.scheduler.shutdown()
    assert setup.timers.pending == []
    setup.timers.advance(1.0)
    for owner in setup.owners.values():
        sent = owner.take()
        assert sent and all(isinstance(m, Error) and m.code == "shutdown" for m in sent)


async def test_a_late_loop_sends_at_once_and_drops_the_overdue_timer() -> None:
    setup = make_setup(max_queue=10)
    jobs = [setup.submit("A", f"a{n}") for n in range(4)]
    owner = setup.owners["A"]
    setup.scheduler.stop(jobs[0], StopReason.CLIENT)
    owner.take()
    setup.timers.advance(0.05)
    setup.scheduler.stop(jobs[1], StopReason.CLIENT)
    [timer] = setup.timers.pending[:1]
    setup.timers.now += 0.5  # the loop is late: the timer is due but has not run
    setup.scheduler.stop(jobs[2], StopReason.CLIENT)
    assert queued(owner) == [("a3", 0)]
    assert timer.cancelled
    setup.timers.advance(1.0)
    assert queued(owner) == []


async def test_many_starts_cost_one_message_per_job_per_interval() -> None:
    setup = make_setup(max_queue=200)
    jobs = [setup.submit(f"S{n % 100}", f"j{n}") for n in range(200)]
    for _ in range(100):  # 100 starts within 0.1 s: unpaced, 14,950 queued
        await setup.scheduler.next_job()
        setup.timers.advance(0.001)
    first = {owner.session_id: queued(owner) for owner in setup.owners.values()}
    assert sum(len(sent) for sent in first.values()) == 199  # each moved once, told at once
    setup.timers.advance(QUEUED_MIN_INTERVAL)
    last = [pair for owner in setup.owners.values() for pair in queued(owner)]
    waiting = jobs[100:]
    assert sorted(last) == sorted((job.id, n) for n, job in enumerate(waiting))
    assert [job.position for job in waiting] == list(range(100))


async def test_the_event_loop_is_the_default_clock() -> None:
    scheduler = Scheduler(max_queue=4, metrics=Metrics())
    owner = Owner("A")
    jobs = [make_job(owner, f"a{n}") for n in range(4)]
    for job in jobs:
        scheduler.submit(job)
    scheduler.stop(jobs[0], StopReason.CLIENT)
    assert queued(owner) == [("a1", 0), ("a2", 1), ("a3", 2)]
    scheduler.stop(jobs[1], StopReason.CLIENT)
    assert queued(owner) == []
    await asyncio.sleep(QUEUED_MIN_INTERVAL / 2)
    assert queued(owner) == []
    await asyncio.sleep(QUEUED_MIN_INTERVAL)
    assert queued(owner) == [("a2", 0), ("a3", 1)]
    scheduler.stop(jobs[2], StopReason.CLIENT)  # deferred, then cancelled by the shutdown
    scheduler.shutdown()
    await asyncio.sleep(QUEUED_MIN_INTERVAL * 1.5)
    assert queued(owner) == []


# =========================================================================== models


async def test_start_takes_a_job_past_those_before_it(setup: Setup) -> None:
    a1 = setup.submit("A", "a1")
    a2 = setup.submit("A", "a2")
    assert setup.scheduler.waiting_in_order() == [a1, a2]
    setup.owners["A"].take()
    setup.scheduler.start(a2)
    assert a2.state is JobState.RUNNING and a1.state is JobState.QUEUED
    assert setup.scheduler.waiting_in_order() == [a1]
    assert setup.owners["A"].take() == [], "a1 did not move"


async def test_loading_is_said_at_once_and_carried_by_later_positions(setup: Setup) -> None:
    a1 = setup.submit("A", "a1")
    b1 = setup.submit("B", "b1")
    setup.scheduler.set_loading(b1, True)
    setup.scheduler.set_loading(b1, True)  # no news: nothing more
    assert setup.owners["B"].take() == [Queued(id="b1", position=1, loading=True)]
    setup.timers.advance(1.0)
    setup.scheduler.stop(a1, StopReason.CLIENT)
    assert setup.owners["B"].take() == [Queued(id="b1", position=0, loading=True)]
    setup.scheduler.set_loading(b1, False)
    assert setup.owners["B"].take() == [Queued(id="b1", position=0, loading=False)]
    setup.scheduler.set_loading(a1, True)  # ended: not waiting, nothing said
    assert setup.owners["A"].take() == [Cancelled(id="a1", step=0, reason="client")]


async def test_end_waiting_ends_a_waiting_job_with_the_message(setup: Setup) -> None:
    a1 = setup.submit("A", "a1")
    a2 = setup.submit("A", "a2")
    setup.owners["A"].take()
    failed = Error(id="a1", code="generation_failed", message="model x could not be loaded")
    setup.scheduler.end_waiting(a1, failed)
    assert a1.state is JobState.ENDED
    assert setup.owners["A"].take() == [failed, Queued(id="a2", position=0)]
    setup.scheduler.end_waiting(a1, failed)  # no longer waiting: nothing
    assert setup.owners["A"].take() == []
    assert setup.scheduler.waiting_in_order() == [a2]


async def test_wait_for_change_returns_on_a_submit_or_a_wake(setup: Setup) -> None:
    waiter = asyncio.ensure_future(setup.scheduler.wait_for_change())
    await asyncio.sleep(0)
    assert not waiter.done()
    setup.scheduler.wake()
    await asyncio.wait_for(waiter, 1)
    waiter = asyncio.ensure_future(setup.scheduler.wait_for_change())
    await asyncio.sleep(0)
    setup.submit("A", "a1")
    await asyncio.wait_for(waiter, 1)
