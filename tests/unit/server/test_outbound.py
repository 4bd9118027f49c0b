"""Unit tests for latentcast.server.outbound.OutboundBuffer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from latentcast.protocol import Accepted, Cancelled, Progress, Queued, Started
from latentcast.server.outbound import BufferClosed, OutboundBuffer, Outgoing


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def progress(job_id: str, step: int) -> Callable[[], BaseModel]:
    return lambda: Progress(id=job_id, step=step, steps=10, elapsed_ms=step)


async def take(buffer: OutboundBuffer) -> BaseModel:
    """What the writer does: get, build, confirm."""
    entry = await asyncio.wait_for(buffer.get(), 1.0)
    message = entry.build()
    buffer.sent(entry)
    return message


async def take_all(buffer: OutboundBuffer) -> list[BaseModel]:
    return [await take(buffer) for _ in range(len(buffer))]


async def test_order_is_preserved() -> None:
    buffer = OutboundBuffer()
    buffer.put(Accepted(id="a", position=0))
    buffer.put_latest(("a", "queued"), lambda: Queued(id="a", position=1))
    buffer.put(Started(id="a", seed=1, steps=2, width=64, height=64))
    buffer.put_latest(("a", "progress"), progress("a", 1))
    buffer.put(Cancelled(id="a", step=1, reason="client"))
    assert len(buffer) == 5
    assert await take_all(buffer) == [
        Accepted(id="a", position=0),
        Queued(id="a", position=1),
        Started(id="a", seed=1, steps=2, width=64, height=64),
        Progress(id="a", step=1, steps=10, elapsed_ms=1),
        Cancelled(id="a", step=1, reason="client"),
    ]
    assert len(buffer) == 0


async def test_droppable_of_the_same_key_is_replaced_and_moves_to_the_back() -> None:
    buffer = OutboundBuffer()
    buffer.put_latest(("a", "progress"), progress("a", 1))
    buffer.put(Accepted(id="b", position=0))
    buffer.put_latest(("a", "progress"), progress("a", 2))
    assert len(buffer) == 2
    # The older progress is gone (not overwritten in place before b's accepted).
    assert await take_all(buffer) == [
        Accepted(id="b", position=0),
        Progress(id="a", step=2, steps=10, elapsed_ms=2),
    ]


async def test_droppables_of_different_keys_are_kept() -> None:
    buffer = OutboundBuffer()
    buffer.put_latest(("a", "progress"), progress("a", 1))
    buffer.put_latest(("b", "progress"), progress("b", 1))
    buffer.put_latest(("a", "queued"), lambda: Queued(id="a", position=3))
    buffer.put_latest(("a", "preview"), progress("a", 1))
    assert len(buffer) == 4
    messages = await take_all(buffer)
    assert [(m.type, m.id) for m in messages] == [  # type: ignore[attr-defined]
        ("progress", "a"),
        ("progress", "b"),
        ("queued", "a"),
        ("progress", "a"),
    ]


async def test_builders_of_replaced_entries_are_never_called() -> None:
    calls: list[int] = []

    def builder(step: int) -> Callable[[], BaseModel]:
        def build() -> BaseModel:
            calls.append(step)
            return Progress(id="a", step=step, steps=10, elapsed_ms=0)

        return build

    buffer = OutboundBuffer()
    for step in range(1, 6):
        buffer.put_latest(("a", "progress"), builder(step))
    assert calls == []  # lazily built
    assert len(buffer) == 1
    message = await take(buffer)
    assert calls == [5]
    assert message == Progress(id="a", step=5, steps=10, elapsed_ms=0)


async def test_a_taken_droppable_is_not_replaced_by_a_later_one() -> None:
    buffer = OutboundBuffer()
    buffer.put_latest(("a", "progress"), progress("a", 1))
    entry = await buffer.get()  # being written
    buffer.put_latest(("a", "progress"), progress("a", 2))
    assert len(buffer) == 1
    assert entry.build() == Progress(id="a", step=1, steps=10, elapsed_ms=1)
    buffer.sent(entry)
    assert await take(buffer) == Progress(id="a", step=2, steps=10, elapsed_ms=2)


async def test_non_droppable_messages_are_never_dropped() -> None:
    buffer = OutboundBuffer()
    for n in range(100):
        buffer.put(Queued(id="a", position=n))  # even a droppable type, put reliably
        buffer.put_latest(("a", "queued"), lambda n=n: Queued(id="a", position=1000 + n))
    assert len(buffer) == 101
    assert buffer.reliable_backlog == 100
    messages = await take_all(buffer)
    assert messages == [Queued(id="a", position=n) for n in range(100)] + [
        Queued(id="a", position=1099)
    ]
    assert buffer.reliable_backlog == 0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["put", "latest", "take"]), st.sampled_from(["a", "b"])),
        max_size=40,
    )
)
def test_steps_never_decrease_and_reliable_messages_all_arrive(
    ops: list[tuple[str, str]],
) -> None:
    async def run() -> None:
        buffer = OutboundBuffer()
        step = {"a": 0, "b": 0}
        put_reliable: list[BaseModel] = []
        received: list[BaseModel] = []
        for op, job in ops:
            if op == "put":
                message = Accepted(id=job, position=len(put_reliable))
                put_reliable.append(message)
                buffer.put(message)
            elif op == "latest":
                step[job] += 1
                buffer.put_latest((job, "progress"), progress(job, step[job]))
            elif len(buffer):
                received.append(await take(buffer))
        received.extend(await take_all(buffer))
        assert [m for m in received if isinstance(m, Accepted)] == put_reliable
        for job in ("a", "b"):
            steps = [m.step for m in received if isinstance(m, Progress) and m.id == job]
            assert steps == sorted(set(steps))
            if step[job]:
                assert steps[-1] == step[job]  # the latest always arrives

    asyncio.run(run())


async def test_reliable_backlog_and_oldest_unsent_age_with_a_fake_clock() -> None:
    clock = FakeClock(100.0)
    buffer = OutboundBuffer(clock=clock)
    assert buffer.reliable_backlog == 0
    assert buffer.oldest_unsent_age() == 0.0

    buffer.put_latest(("a", "progress"), progress("a", 1))
    clock.now = 105.0
    assert buffer.reliable_backlog == 0
    assert buffer.oldest_unsent_age() == 0.0  # droppables do not count

    buffer.put(Accepted(id="a", position=0))
    clock.now = 107.0
    buffer.put(Accepted(id="b", position=1))
    clock.now = 110.0
    assert buffer.reliable_backlog == 2
    assert buffer.oldest_unsent_age() == pytest.approx(5.0)

    first = await buffer.get()  # the progress
    assert first.droppable
    buffer.sent(first)
    assert buffer.reliable_backlog == 2

    second = await buffer.get()  # accepted a: taken but not yet confirmed
    assert not second.droppable
    assert buffer.reliable_backlog == 2
    assert buffer.oldest_unsent_age() == pytest.approx(5.0)
    clock.now = 120.0
    assert buffer.oldest_unsent_age() == pytest.approx(15.0)

    buffer.sent(second)
    assert buffer.reliable_backlog == 1
    assert buffer.oldest_unsent_age() == pytest.approx(13.0)  # accepted b, put at 107

    buffer.sent(await buffer.get())
    assert buffer.reliable_backlog == 0
    assert buffer.oldest_unsent_age() == 0.0


async def test_outgoing_entries() -> None:
    clock = FakeClock(3.0)
    buffer = OutboundBuffer(clock=clock)
    accepted = Accepted(id="a", position=0)
    buffer.put(accepted)
    buffer.put_latest(("a", "queued"), lambda: Queued(id="a", position=2))
    first = await buffer.get()
    second = await buffer.get()
    assert isinstance(first, Outgoing)
    assert first.seq < second.seq
    assert (first.droppable, second.droppable) == (False, True)
    assert first.enqueued_at == 3.0
    assert first.build() is accepted


async def test_sent_and_wait_empty() -> None:
    buffer = OutboundBuffer()
    await asyncio.wait_for(buffer.wait_empty(), 1.0)  # empty from the start

    buffer.put(Accepted(id="a", position=0))
    buffer.put_latest(("a", "progress"), progress("a", 1))
    waiter = asyncio.create_task(buffer.wait_empty())
    await asyncio.sleep(0.01)
    assert not waiter.done()

    entry = await buffer.get()
    buffer.sent(entry)
    await asyncio.sleep(0.01)
    assert not waiter.done()

    entry = await buffer.get()
    assert len(buffer) == 0
    await asyncio.sleep(0.01)
    assert not waiter.done()  # taken is not yet sent
    buffer.sent(entry)
    await asyncio.wait_for(waiter, 1.0)

    # A new message makes it non-empty again.
    buffer.put(Accepted(id="b", position=0))
    waiter = asyncio.create_task(buffer.wait_empty())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await take(buffer)
    await asyncio.wait_for(waiter, 1.0)


async def test_get_waits_for_a_message() -> None:
    buffer = OutboundBuffer()
    getter = asyncio.create_task(buffer.get())
    await asyncio.sleep(0.01)
    assert not getter.done()
    buffer.put_latest(("a", "progress"), progress("a", 4))
    entry = await asyncio.wait_for(getter, 1.0)
    assert entry.build() == Progress(id="a", step=4, steps=10, elapsed_ms=4)


async def test_close_wakes_a_waiting_get_and_discards() -> None:
    buffer = OutboundBuffer()
    getter = asyncio.create_task(buffer.get())
    await asyncio.sleep(0.01)
    assert not getter.done()
    buffer.close()
    with pytest.raises(BufferClosed):
        await asyncio.wait_for(getter, 1.0)
    assert buffer.closed


async def test_close_discards_what_is_queued_and_refuses_more() -> None:
    calls: list[str] = []

    def build() -> BaseModel:
        calls.append("built")
        return Queued(id="a", position=1)

    clock = FakeClock()
    buffer = OutboundBuffer(clock=clock)
    buffer.put(Accepted(id="a", position=0))
    buffer.put_latest(("a", "queued"), build)
    waiter = asyncio.create_task(buffer.wait_empty())
    clock.now += 50
    assert not buffer.closed
    buffer.close()
    assert buffer.closed
    assert len(buffer) == 0
    assert buffer.reliable_backlog == 0
    assert buffer.oldest_unsent_age() == 0.0
    await asyncio.wait_for(waiter, 1.0)
    buffer.put(Accepted(id="b", position=0))
    buffer.put_latest(("b", "queued"), build)
    assert len(buffer) == 0
    assert buffer.reliable_backlog == 0
    with pytest.raises(BufferClosed):
        await asyncio.wait_for(buffer.get(), 1.0)
    assert calls == []


async def test_wait_backlog_below_blocks_until_the_writer_catches_up() -> None:
    buffer = OutboundBuffer()
    for k in range(3):
        buffer.put(Accepted(id=f"j{k}", position=k))
    waiter = asyncio.create_task(buffer.wait_backlog_below(2))
    await asyncio.sleep(0.01)
    assert not waiter.done(), "3 unsent reliable messages: at or above the limit of 2"
    buffer.sent(await buffer.get())
    await asyncio.sleep(0.01)
    assert not waiter.done(), "2 still unsent"
    buffer.sent(await buffer.get())
    await asyncio.wait_for(waiter, 1)
    # Droppable messages never count toward the backlog.
    buffer.put_latest(("j", "progress"), lambda: Progress(id="j", step=1, steps=2, elapsed_ms=0))
    await asyncio.wait_for(buffer.wait_backlog_below(2), 1)


async def test_wait_backlog_below_returns_when_the_buffer_closes() -> None:
    buffer = OutboundBuffer()
    buffer.put(Accepted(id="j", position=0))
    waiter = asyncio.create_task(buffer.wait_backlog_below(1))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    buffer.close()
    await asyncio.wait_for(waiter, 1)


async def test_restart_clock_counts_the_age_of_what_waits_from_now() -> None:
    clock = FakeClock()
    buffer = OutboundBuffer(clock=clock)
    buffer.put(Accepted(id="a", position=0))
    clock.now += 25
    assert buffer.oldest_unsent_age() == 25
    buffer.restart_clock()
    assert buffer.oldest_unsent_age() == 0
    clock.now += 3
    assert buffer.oldest_unsent_age() == 3
    entry = await buffer.get()
    buffer.sent(entry)
    assert buffer.oldest_unsent_age() == 0
