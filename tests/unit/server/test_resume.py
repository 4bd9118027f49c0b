"""The replay log and the resume registry (server/resume.py), without sockets."""

from __future__ import annotations

import asyncio

import pytest

from latentcast.protocol import (
    Accepted,
    Cancelled,
    Complete,
    Error,
    ErrorCode,
    Progress,
    Queued,
    Started,
    Timings,
    decode_server_message,
)
from latentcast.server.metrics import Metrics
from latentcast.server.resume import ReplayLog, ResumeRegistry, ResumeRequest, token_tag


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_log(window: float = 30.0, max_bytes: int = 10**6) -> tuple[ReplayLog, Clock]:
    clock = Clock()
    return ReplayLog(window=window, max_bytes=max_bytes, clock=clock), clock


def started(job_id: str) -> Started:
    return Started(id=job_id, seed=1, steps=4, width=64, height=64)


def progress(job_id: str, step: int) -> Progress:
    return Progress(id=job_id, step=step, steps=4, elapsed_ms=step)


def complete(job_id: str) -> Complete:
    return Complete(id=job_id, images=[], timings=Timings(queued_ms=0, run_ms=1))


def test_write_stamps_consecutive_seqs_from_one_into_the_frame() -> None:
    log, _ = make_log()
    frames = [
        log.write(Accepted(id="a", position=0), droppable=False),
        log.write(Queued(id="a", position=0), droppable=True),
        log.write(started("a"), droppable=False),
    ]
    assert [decode_server_message(frame).seq for frame in frames] == [1, 2, 3]
    assert log.last_seq == 3


def test_replay_gives_the_kept_non_droppable_frames_after_a_seq_unchanged() -> None:
    log, _ = make_log()
    accepted = log.write(Accepted(id="a", position=0), droppable=False)
    log.write(Queued(id="a", position=0), droppable=True)
    start = log.write(started("a"), droppable=False)
    log.write(progress("a", 1), droppable=True)
    end = log.write(complete("a"), droppable=False)
    assert log.replay(0) == [accepted, start, end]
    assert log.replay(2) == [start, end]
    assert log.replay(5) == []


def test_droppable_state_is_the_latest_per_kind_of_unfinished_jobs_not_yet_processed() -> None:
    log, _ = make_log()
    log.write(Accepted(id="a", position=1), droppable=False)  # 1
    log.write(Queued(id="a", position=1), droppable=True)  # 2
    log.write(Queued(id="a", position=0), droppable=True)  # 3
    log.write(Accepted(id="b", position=1), droppable=False)  # 4
    log.write(Queued(id="b", position=1), droppable=True)  # 5
    state = log.droppable_state({"a", "b"}, after=0)
    assert state == [Queued(id="a", position=0), Queued(id="b", position=1)]
    assert all(message.seq is None for message in state)
    # What the client processed already is not sent again; nor a job no longer unfinished.
    assert log.droppable_state({"a", "b"}, after=3) == [Queued(id="b", position=1)]
    assert log.droppable_state({"b"}, after=0) == [Queued(id="b", position=1)]


def test_started_drops_the_queued_state_and_a_terminal_drops_them_all() -> None:
    log, _ = make_log()
    log.write(Accepted(id="a", position=0), droppable=False)
    log.write(Queued(id="a", position=0), droppable=True)
    log.write(started("a"), droppable=False)
    log.write(progress("a", 2), droppable=True)
    assert log.droppable_state({"a"}, after=0) == [progress("a", 2)]
    log.write(Cancelled(id="a", step=2, reason="client"), droppable=False)
    assert log.droppable_state({"a"}, after=0) == []
    # An error that only answers a submit is not a terminal message of the job.
    log.write(Accepted(id="b", position=0), droppable=False)
    log.write(started("b"), droppable=False)
    log.write(progress("b", 1), droppable=True)
    duplicate = Error(id="b", code=ErrorCode.DUPLICATE_ID, message="still running")
    log.write(duplicate, droppable=False)
    assert log.droppable_state({"b"}, after=0) == [progress("b", 1)]
    log.write(Error(id="b", code=ErrorCode.SHUTDOWN, message="bye"), droppable=False)
    assert log.droppable_state({"b"}, after=0) == []


def test_messages_older_than_the_window_are_forgotten_and_a_resume_before_them_refused() -> None:
    log, clock = make_log(window=30.0)
    log.write(Accepted(id="a", position=0), droppable=False)  # 1
    clock.now += 20
    second = log.write(started("a"), droppable=False)  # 2
    assert log.covers(0) and log.covers(2)
    clock.now += 15  # seq 1 is 35 s old, seq 2 15 s
    assert log.replay(0) == [second]
    assert not log.covers(0), "seq 1 is gone: a resume after 0 would miss it"
    assert log.covers(1) and log.covers(2)
    assert not log.covers(3), "a seq never written"
    assert not log.covers(-1)


def test_the_log_is_bounded_in_bytes_oldest_first() -> None:
    log, _ = make_log(max_bytes=300)
    frames = [log.write(Accepted(id=f"job-{n}", position=n), droppable=False) for n in range(30)]
    assert log.kept_bytes <= 300
    assert 0 < len(log) < 30
    kept = log.replay(0)
    assert kept == frames[-len(kept) :]
    assert not log.covers(0)
    assert log.covers(30 - len(kept))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/v1/ws", ResumeRequest()),
        ("/v1/ws?resumable=1", ResumeRequest(resumable=True)),
        ("/v1/ws?resumable=true", ResumeRequest()),
        ("/v1/ws?resume=abc", ResumeRequest(token="abc", after=0)),
        ("/v1/ws?resume=abc&after=17", ResumeRequest(token="abc", after=17)),
        ("/v1/ws?resume=abc&after=-1", ResumeRequest(token="abc", after=None)),
        ("/v1/ws?resume=abc&after=1.5", ResumeRequest(token="abc", after=None)),
        ("/v1/ws?resume=abc&after=", ResumeRequest(token="abc", after=None)),
        ("/v1/ws?resume=&after=3", ResumeRequest(after=3)),
    ],
)
def test_resume_request_from_the_upgrade_path(path: str, expected: ResumeRequest) -> None:
    assert ResumeRequest.from_path(path) == expected


class FakeSession:
    def __init__(self, session_id: str) -> None:
        self.id = session_id
        self.expired = 0

    def expire(self) -> None:
        self.expired += 1


async def test_a_token_is_claimed_once_and_a_new_one_voids_the_old() -> None:
    registry: ResumeRegistry[FakeSession] = ResumeRegistry(window=30, metrics=Metrics())
    session = FakeSession("s1")
    token = registry.issue(session)
    assert len(token) >= 22 and token_tag(token) not in token
    assert registry.valid(token)
    assert not registry.valid(token[:-1] + ("A" if token[-1] != "A" else "B"))
    newer = registry.issue(session)
    assert not registry.valid(token) and registry.valid(newer)
    assert registry.claim(token) is None
    assert registry.claim(newer) is session
    assert registry.claim(newer) is None, "a token resumes once"


async def test_a_detached_session_expires_after_the_window_unless_attached() -> None:
    metrics = Metrics()
    registry: ResumeRegistry[FakeSession] = ResumeRegistry(window=0.05, metrics=metrics)
    kept, lost = FakeSession("kept"), FakeSession("lost")
    registry.issue(kept)
    lost_token = registry.issue(lost)
    registry.detached(kept)
    registry.detached(lost)
    assert set(registry.detached_sessions()) == {kept, lost}
    registry.attached(kept)
    await asyncio.sleep(0.2)
    assert (kept.expired, lost.expired) == (0, 1)
    assert not registry.valid(lost_token)
    assert "latentcast_session_resume_expiries_total 1.0" in metrics.render().decode()


async def test_close_ends_every_detached_session() -> None:
    registry: ResumeRegistry[FakeSession] = ResumeRegistry(window=30, metrics=Metrics())
    session = FakeSession("s")
    registry.issue(session)
    registry.detached(session)
    registry.close()
    assert session.expired == 1 and registry.detached_sessions() == []


def test_a_message_type_without_seq_is_refused_loudly() -> None:
    log, _ = make_log()
    with pytest.raises(TypeError, match="Timings has no seq"):
        log.write(Timings(queued_ms=0, run_ms=1), droppable=False)
    assert log.last_seq == 0
