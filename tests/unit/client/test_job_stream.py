"""A job's event stream and state machine, fed by hand (no server): PROTOCOL.md 4 and 5.3."""

from __future__ import annotations

import asyncio

import pytest

from latentcast.client import ConnectionLost, JobCancelled, JobFailed, RequestRejected
from latentcast.client.job import Job, _EventBuffer
from latentcast.protocol import (
    Accepted,
    Cancelled,
    Complete,
    Error,
    GenerationParams,
    ImageResult,
    LatentPreview,
    Progress,
    Queued,
    Started,
    Submit,
    Timings,
)


def _progress(step: int, job_id: str = "a") -> Progress:
    return Progress(id=job_id, step=step, steps=10, elapsed_ms=step)


def _preview(step: int, job_id: str = "a") -> LatentPreview:
    return LatentPreview(id=job_id, step=step, shape=(4, 1, 1), data=b"\0" * 8)


def _job(job_id: str = "a") -> tuple[Job, list[str]]:
    cancels: list[str] = []

    async def send_cancel(job: Job) -> None:
        cancels.append(job.id)

    submit = Submit(id=job_id, params=GenerationParams(prompt="p"))
    return Job(submit, send_cancel), cancels


async def _drain(buffer: _EventBuffer) -> list[object]:
    events = []
    while (event := await buffer.get()) is not None:
        events.append(event)
    return events


async def test_droppable_events_are_latest_wins_and_move_to_the_back() -> None:
    buffer = _EventBuffer()
    buffer.put(Accepted(id="a", position=2))
    buffer.put(Queued(id="a", position=1))
    buffer.put(Queued(id="a", position=0))
    buffer.put(Started(id="a", seed=1, steps=10, width=64, height=64))
    for step in range(1, 6):
        buffer.put(_progress(step))
        buffer.put(_preview(step))
    buffer.put(_progress(6))
    assert len(buffer) == 5, "one unread event per droppable type, the others all kept"
    buffer.end()
    events = await _drain(buffer)
    assert [event.type for event in events] == [
        "accepted",
        "queued",
        "started",
        "preview",
        "progress",
    ]
    assert events[1].position == 0
    assert (events[3].step, events[4].step) == (5, 6), "steps never go backwards"


async def test_a_reader_that_keeps_up_sees_every_event() -> None:
    buffer = _EventBuffer()
    seen = []
    for step in range(1, 4):
        buffer.put(_progress(step))
        seen.append(await buffer.get())
    assert [event.step for event in seen] == [1, 2, 3]


async def test_a_failure_comes_after_the_buffered_events() -> None:
    buffer = _EventBuffer()
    buffer.put(Accepted(id="a", position=0))
    buffer.fail(ConnectionLost("gone"))
    assert (await buffer.get()).type == "accepted"
    with pytest.raises(ConnectionLost):
        await buffer.get()


async def test_get_waits_for_the_next_event() -> None:
    buffer = _EventBuffer()
    waiter = asyncio.create_task(buffer.get())
    await asyncio.sleep(0)
    assert not waiter.done()
    buffer.put(_progress(1))
    assert (await waiter).step == 1


async def test_a_job_goes_from_accepted_to_complete() -> None:
    job, _ = _job()
    assert job.status == "submitting"
    assert not job._deliver(Accepted(id="a", position=1))
    await job._wait_answer()
    assert (job.status, job.position) == ("queued", 1)
    job._deliver(Queued(id="a", position=0))
    assert job.position == 0
    job._deliver(Started(id="a", seed=7, steps=2, width=64, height=64))
    assert (job.status, job.position, job.started.seed) == ("running", None, 7)
    job._deliver(_progress(1))
    assert job.progress.step == 1
    image = ImageResult(data=b"png", format="png", width=64, height=64, seed=7)
    complete = Complete(id="a", images=[image], timings=Timings(queued_ms=1, run_ms=2))
    assert job._deliver(complete), "the terminal message ends the job"
    assert job.done and job.status == "complete"
    result = await job.result()
    assert (result.job_id, result.image.seed, result.image.data) == ("a", 7, b"png")
    assert result.started is job.started
    types = [event.type async for event in job]
    assert types == ["accepted", "queued", "started", "progress", "complete"]


async def test_a_rejected_submit_raises_request_rejected() -> None:
    job, _ = _job()
    error = Error(id="a", code="queue_full", message="full")
    assert job._deliver(error)
    with pytest.raises(RequestRejected) as rejected:
        await job._wait_answer()
    assert (rejected.value.code, rejected.value.field, rejected.value.local) == (
        "queue_full",
        None,
        False,
    )
    assert job.status == "rejected"


async def test_terminal_errors_fail_the_job_and_other_errors_do_not() -> None:
    job, _ = _job()
    job._deliver(Accepted(id="a", position=0))
    assert not job._deliver(Error(id="a", code="duplicate_id", message="answers a submit"))
    assert not job.done
    assert job._deliver(Error(id="a", code="shutdown", message="stopping"))
    with pytest.raises(JobFailed) as failed:
        await job.result()
    assert failed.value.code == "shutdown"
    assert job.status == "failed"


async def test_cancelled_raises_job_cancelled_and_cancel_is_sent_once() -> None:
    job, cancels = _job()
    job._deliver(Accepted(id="a", position=0))
    await job.cancel()
    await job.cancel()
    assert cancels == ["a"]
    job._deliver(Cancelled(id="a", step=3, reason="client"))
    with pytest.raises(JobCancelled) as cancelled:
        await job.result()
    assert (cancelled.value.reason, cancelled.value.step) == ("client", 3)
    await job.cancel()
    assert cancels == ["a"], "cancelling an ended job sends nothing"


async def test_nothing_about_a_job_follows_its_end() -> None:
    job, _ = _job()
    job._deliver(Accepted(id="a", position=0))
    job._deliver(Cancelled(id="a", step=0, reason="replaced"))
    job._deliver(_progress(1))
    assert [event.type async for event in job] == ["accepted", "cancelled"]


async def test_connection_loss_fails_result_stream_and_a_pending_submit() -> None:
    running, _ = _job("a")
    running._deliver(Accepted(id="a", position=0))
    pending, _ = _job("b")
    lost = ConnectionLost("the server closed the connection (1001)", code=1001)
    running._connection_lost(lost)
    pending._connection_lost(lost)
    with pytest.raises(ConnectionLost):
        await running.result()
    with pytest.raises(ConnectionLost):
        await pending._wait_answer()
    events = []
    with pytest.raises(ConnectionLost):
        async for event in running:
            events.append(event.type)
    assert events == ["accepted"]
    assert running.status == "lost"


async def test_one_reader_at_a_time() -> None:
    job, _ = _job()
    job._deliver(Accepted(id="a", position=0))
    first = job.events()
    assert (await anext(first)).type == "accepted"
    with pytest.raises(RuntimeError):
        await anext(job.events())
    await first.aclose()
