"""The client's resume helpers (latentcast.client.resume), without sockets."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from latentcast.client.resume import (
    SeqTracker,
    may_resume,
    resume_url,
    retry_delays,
    with_query,
)


def test_seq_tracker_drops_what_was_processed_and_keeps_messages_without_seq() -> None:
    seen = SeqTracker()
    assert [seen.fresh(seq) for seq in (1, 2, 3)] == [True, True, True]
    # A resume after 1 (a lower after than processed) sends 2 and 3 again, then 4.
    assert [seen.fresh(seq) for seq in (2, 3, 4)] == [False, False, True]
    assert seen.fresh(None) and seen.last == 4
    assert not seen.fresh(4)


def test_resume_url_keeps_the_path_and_the_auth_token_and_drops_resumable() -> None:
    url = resume_url("ws://h:1/v1/ws?resumable=1&token=t", "abc-_", 17)
    parts = urlsplit(url)
    assert (parts.netloc, parts.path) == ("h:1", "/v1/ws")
    assert parse_qs(parts.query) == {"token": ["t"], "resume": ["abc-_"], "after": ["17"]}


def test_with_query_sets_one_parameter() -> None:
    assert with_query("ws://h/v1/ws", resumable="1") == "ws://h/v1/ws?resumable=1"
    assert with_query("ws://h/v1/ws?resumable=0&x=1", resumable="1").endswith("x=1&resumable=1")


def test_retry_delays_start_at_once_and_double() -> None:
    assert retry_delays(5, 0.2) == pytest.approx([0.0, 0.2, 0.4, 0.8, 1.6])
    assert retry_delays(0, 0.2) == []


@pytest.mark.parametrize(
    ("code", "expected"),
    [(None, True), (1006, True), (1011, True), (1000, False), (1001, False), (1008, False)],
)
def test_which_ends_of_a_connection_are_worth_a_resume(code: int | None, expected: bool) -> None:
    assert may_resume(code) is expected
