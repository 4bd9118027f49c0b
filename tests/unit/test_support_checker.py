"""tests/support.py's check_guarantees catches what it should (a checker that passes
everything would make the resume tests worthless)."""

from __future__ import annotations

from typing import Any

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
)
from tests.support import check_guarantees


def job(job_id: str, seq: int = 0) -> list[Any]:
    messages: list[Any] = [
        Accepted(id=job_id, position=1),
        Queued(id=job_id, position=0),
        Started(id=job_id, seed=1, steps=2, width=64, height=64),
        Progress(id=job_id, step=1, steps=2, elapsed_ms=1),
        Complete(id=job_id, images=[], timings=Timings(queued_ms=0, run_ms=1)),
    ]
    return [m.model_copy(update={"seq": seq + k + 1}) if seq else m for k, m in enumerate(messages)]


def test_a_correct_stream_passes() -> None:
    check_guarantees(["a", "b"], job("a", seq=0) + job("b"))
    check_guarantees(["a"], job("a", seq=10), seq=True)
    rejected = Error(id="x", code=ErrorCode.QUEUE_FULL, message="full")
    check_guarantees(["a", "x"], [*job("a"), rejected])


@pytest.mark.parametrize(
    ("submitted", "messages", "why"),
    [
        (["b", "a"], job("a") + job("b"), "answers"),
        (["a"], job("a")[:-1], "without a terminal"),
        (["a"], [*job("a"), Cancelled(id="a", step=1, reason="client")], "second terminal"),
        (["a"], [job("a")[0], job("a")[2], job("a")[1], *job("a")[3:]], "after"),
        (["a"], [job("a")[0], job("a")[3], *job("a")[4:]], "before started"),
        (["a"], [*job("a")[:3], job("a")[2], *job("a")[3:]], "after"),
        (["a"], [job("a")[0], *job("a")], "answers"),
    ],
)
def test_violations_are_caught(submitted: list[str], messages: list[Any], why: str) -> None:
    with pytest.raises(AssertionError, match=why):
        check_guarantees(submitted, messages)


def test_seq_must_strictly_increase_and_be_present() -> None:
    messages = job("a", seq=10)
    with pytest.raises(AssertionError, match="seq order"):
        check_guarantees(["a"], [messages[0], messages[2], messages[1], *messages[3:]], seq=True)
    with pytest.raises(AssertionError, match="without seq"):
        check_guarantees(["a"], job("a"), seq=True)
