"""Resumable sessions over real sockets (PROTOCOL.md section 2a)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from latentcast.client import ConnectionLost, connect
from latentcast.protocol import Cancelled, Complete, Progress
from tests.support import (
    LONG_JOB,
    ONE_AT_A_TIME,
    Client,
    TcpRelay,
    check_guarantees,
    is_terminal,
    open_client,
    open_stalled_client,
    wait_for,
)

#: A job that runs long enough to be cut in the middle on any machine, with short steps.
RUNNING: dict[str, Any] = {"steps": 40, "width": 128, "height": 128}
LATENT_PREVIEWS: dict[str, Any] = {"kind": "latent"}
#: A result (four 128x128 PNGs of noise) big enough to block the writer of a client that
#: does not read (tests/support.py, open_stalled_client).
BIG: dict[str, Any] = {
    "width": 128,
    "height": 128,
    "num_images": 4,
    "steps": 2,
    "guidance_scale": 1.0,
}


def resume_url(server: Any, token: str | None, after: int | str | None) -> str:
    query = [f"resume={token}"] if token is not None else []
    if after is not None:
        query.append(f"after={after}")
    return f"{server.ws_url}?{'&'.join(query)}"


def last_seq(client: Client) -> int:
    seqs = [m.seq for m in client.received if m.type != "welcome"]
    return seqs[-1] if seqs else 0


async def drop(client: Client) -> None:
    """Lose the connection without a close frame, as a network that goes away would."""
    client.ws.transport.abort()
    await client.ws.wait_closed()


async def test_welcome_offers_resume_and_a_token_only_when_asked(start_server) -> None:
    async with start_server() as server:
        plain = await open_client(server.ws_url)
        assert "resume" in plain.welcome.features
        assert plain.welcome.resume_token is None and plain.welcome.resumed is False
        await plain.submit("plain", steps=1)
        assert all(m.seq is None for m in await plain.job_messages("plain"))
        resumable = await open_client(server.ws_url + "?resumable=1")
        token = resumable.welcome.resume_token
        assert isinstance(token, str) and len(token) >= 22  # >= 128 bits in base64url
        assert resumable.welcome.resumed is False
        await resumable.submit("one", steps=2)
        await resumable.job_messages("one")
        check_guarantees(["one"], resumable.received, seq=True)
        assert resumable.received[0].seq == 1, "seq starts at 1 after welcome"
        await plain.close()
        await resumable.close()


async def test_a_dropped_connection_is_resumed_with_every_job_intact(start_server) -> None:
    """Test 1 of the brief: abort mid-job, resume after the last seq processed; across
    both connections guarantees 1-3 hold for every job (queued ones, the running one,
    previews on), and the seq goes on strictly increasing."""
    async with start_server(**ONE_AT_A_TIME) as server:
        first = await open_client(server.ws_url + "?resumable=1")
        token = first.welcome.resume_token
        submitted = ["running", "queued-1", "queued-2", "queued-3"]
        await first.submit("running", preview=LATENT_PREVIEWS, **RUNNING)
        for job_id in submitted[1:]:
            await first.submit(job_id, steps=3, preview=LATENT_PREVIEWS)
        await first.recv_until(
            lambda m: isinstance(m, Progress) and m.id == "running" and m.step >= 2
        )
        await drop(first)
        # The session is detached, not ended: its jobs go on (all complete, below).
        await wait_for(lambda: not server.sessions)
        assert [s.id for s in server.resumes.detached_sessions()] == [first.welcome.session]
        second = await open_client(resume_url(server, token, last_seq(first)))
        assert second.welcome.resumed is True
        assert second.welcome.session == first.welcome.session
        assert second.welcome.resume_token not in (None, token)
        for job_id in submitted:
            await second.ended(job_id)
        everything = first.received + second.received
        check_guarantees(submitted, everything, seq=True)
        assert all(isinstance(m, Complete) for m in everything if is_terminal(m))
        assert "latentcast_session_resumes_total 1.0" in server.metrics.render().decode()
        await second.close()


async def test_after_the_window_the_session_is_gone_and_its_jobs_cancelled(start_server) -> None:
    async with start_server(resume_window=0.5, **ONE_AT_A_TIME) as server:
        first = await open_client(server.ws_url + "?resumable=1")
        await first.submit("running", **LONG_JOB)
        await first.recv_until(lambda m: m.type == "started")
        await drop(first)
        await wait_for(lambda: not server.scheduler.unfinished)
        second = await open_client(resume_url(server, first.welcome.resume_token, last_seq(first)))
        assert second.welcome.resumed is False
        assert second.welcome.session != first.welcome.session
        metrics = server.metrics.render().decode()
        assert 'latentcast_jobs_total{outcome="cancelled"} 1.0' in metrics
        assert "latentcast_session_resume_expiries_total 1.0" in metrics
        await second.close()


async def test_a_token_resumes_once_and_a_wrong_one_never(start_server) -> None:
    async with start_server() as server:
        first = await open_client(server.ws_url + "?resumable=1")
        token = first.welcome.resume_token
        await first.submit("one", steps=1)
        await first.job_messages("one")
        await drop(first)
        second = await open_client(resume_url(server, token, last_seq(first)))
        assert second.welcome.resumed is True
        await drop(second)
        reused = await open_client(resume_url(server, token, last_seq(first)))
        assert reused.welcome.resumed is False
        assert reused.welcome.session != first.welcome.session
        assert reused.welcome.resume_token is not None, "a failed resume is resumable itself"
        wrong = await open_client(resume_url(server, "x" * 32, 0))
        assert wrong.welcome.resumed is False
        assert wrong.welcome.session not in (first.welcome.session, reused.welcome.session)
        # The token of the second connection still works.
        third = await open_client(resume_url(server, second.welcome.resume_token, 0))
        assert third.welcome.resumed is True
        assert third.welcome.session == first.welcome.session
        for client in (reused, wrong, third):
            await client.close()


@pytest.mark.parametrize("after", ["-1", "two", "99999"])
async def test_a_bad_after_gives_a_new_session_and_ends_the_old_one(start_server, after) -> None:
    async with start_server(**ONE_AT_A_TIME) as server:
        first = await open_client(server.ws_url + "?resumable=1")
        await first.submit("running", **RUNNING)
        await first.recv_until(lambda m: m.type == "started")
        await drop(first)
        second = await open_client(resume_url(server, first.welcome.resume_token, after))
        assert second.welcome.resumed is False
        assert second.welcome.session != first.welcome.session
        await wait_for(lambda: not server.scheduler.unfinished)
        await second.close()


async def test_a_lower_after_replays_exactly_the_kept_messages(start_server) -> None:
    """Test 5: what comes again has its old seq and content; nothing non-droppable is
    sent twice beyond that."""
    async with start_server(**ONE_AT_A_TIME) as server:
        first = await open_client(server.ws_url + "?resumable=1")
        await first.submit("a", steps=2)
        await first.submit("b", steps=2)
        await first.job_messages("b")
        await first.submit("running", **RUNNING)
        await first.recv_until(lambda m: m.type == "started")
        await drop(first)
        after = 2
        second = await open_client(resume_url(server, first.welcome.resume_token, after))
        assert second.welcome.resumed is True
        await second.ended("running")
        old = {m.seq: m for m in first.received if m.type != "welcome"}
        again = [m for m in second.received if m.seq in old]
        non_droppable_old = [
            m for seq, m in sorted(old.items()) if seq > after and m.type not in _DROPPABLE
        ]
        assert [m for m in again if m.type not in _DROPPABLE] == non_droppable_old
        for message in again:
            assert message == old[message.seq], "a replayed message is the same message"
        # Beyond the replay, each job's non-droppable messages come once.
        body = first.received + [m for m in second.received if m.seq not in old]
        check_guarantees(["a", "b", "running"], body, seq=True)
        await second.close()


_DROPPABLE = ("queued", "progress", "preview")


async def test_a_resume_wins_over_a_connection_still_open(start_server) -> None:
    async with start_server(**ONE_AT_A_TIME) as server:
        first = await open_client(server.ws_url + "?resumable=1")
        await first.submit("running", preview=LATENT_PREVIEWS, **RUNNING)
        await first.recv_until(lambda m: m.type == "started")
        second = await open_client(resume_url(server, first.welcome.resume_token, last_seq(first)))
        assert second.welcome.resumed is True
        await first.ws.wait_closed()
        assert first.ws.close_code in (1000, 1001)
        # Whatever the first connection read before it was closed counts as processed.
        await second.ended("running")
        seen = {m.seq for m in first.received}
        check_guarantees(
            ["running"], first.received + [m for m in second.received if m.seq not in seen]
        )
        await second.close()


async def test_a_resume_wins_over_a_half_open_connection(start_server) -> None:
    """The client's network went away but the server still sees the connection open:
    the resume closes it (it cannot even take the close frame, so it is aborted)."""
    async with start_server(**ONE_AT_A_TIME) as server:
        relay = TcpRelay(server.port)
        await relay.start()
        first = await open_client(relay.url(server.ws_url) + "?resumable=1")
        await first.submit("running", preview=LATENT_PREVIEWS, **RUNNING)
        await first.recv_until(lambda m: m.type == "started")
        relay.drop(half_open=True)
        await first.ws.wait_closed()
        (session,) = server.sessions  # still attached: the server saw nothing
        second = await open_client(resume_url(server, first.welcome.resume_token, last_seq(first)))
        assert second.welcome.resumed is True
        assert server.sessions == {session} and session.connection is not None
        await second.ended("running")
        check_guarantees(["running"], first.received + second.received, seq=True)
        await second.close()
        await relay.stop()


async def test_a_resume_is_let_through_during_drain_and_gets_its_terminal_messages(
    start_server,
) -> None:
    async with start_server(drain_timeout=60, **ONE_AT_A_TIME) as server:
        first = await open_client(server.ws_url + "?resumable=1")
        await first.submit("running", **RUNNING)
        await first.submit("queued", steps=2)
        await first.recv_until(lambda m: m.type == "started")
        await drop(first)
        await wait_for(lambda: not server.sessions)
        drain = asyncio.create_task(server.drain())
        await wait_for(lambda: server.phase.value == "draining")
        with pytest.raises(InvalidStatus) as refused:
            await open_client(server.ws_url + "?resumable=1")
        assert refused.value.response.status_code == 503
        with pytest.raises(InvalidStatus):
            await open_client(resume_url(server, "not-a-token", 0))
        second = await open_client(resume_url(server, first.welcome.resume_token, last_seq(first)))
        assert second.welcome.resumed is True
        await second.ended("queued")
        messages = first.received + second.received
        assert [m.type for m in messages].count("draining") == 1
        check_guarantees(["running", "queued"], messages, seq=True)
        await drain
        await second.ws.wait_closed()
        assert second.ws.close_code == 1001


async def test_a_resumable_session_closed_by_the_client_keeps_its_jobs(start_server) -> None:
    """A polite close is a connection that closes, too: the jobs wait for a resume."""
    async with start_server(**ONE_AT_A_TIME) as server:
        first = await open_client(server.ws_url + "?resumable=1")
        await first.submit("running", steps=8)
        await first.recv(), await first.recv()  # accepted, and something more
        await first.close()
        second = await open_client(resume_url(server, first.welcome.resume_token, last_seq(first)))
        assert second.welcome.resumed is True
        terminal = await second.ended("running")
        assert not isinstance(terminal, Cancelled)
        await second.close()


async def test_resuming_needs_a_valid_auth_token(start_server) -> None:
    async with start_server(tokens=("secret",)) as server:
        first = await open_client(server.ws_url + "?resumable=1&token=secret")
        await drop(first)
        with pytest.raises(InvalidStatus) as refused:
            await open_client(resume_url(server, first.welcome.resume_token, 0))
        assert refused.value.response.status_code == 401
        second = await open_client(
            resume_url(server, first.welcome.resume_token, 0) + "&token=secret"
        )
        assert second.welcome.resumed is True
        await second.close()


# --------------------------------------------------------------------------- the client


async def test_the_python_client_resumes_by_itself_and_its_jobs_go_on(start_server) -> None:
    async with start_server(**ONE_AT_A_TIME) as server:
        relay = TcpRelay(server.port)
        await relay.start()
        async with connect(relay.url(server.ws_url), resume_backoff=0.05) as client:
            assert client.welcome.resume_token is not None
            running = await client.submit("running", preview="latent", **RUNNING)
            queued = await client.submit("queued", steps=3, preview="latent")
            events = []

            async def read() -> None:
                async for event in running:
                    events.append(event)

            reader = asyncio.create_task(read())
            async with asyncio.timeout(60):
                while running.progress is None or running.progress.step < 2:
                    await asyncio.sleep(0.01)
            relay.drop()
            result = await running.result()
            assert len(result.images) == 1
            assert len((await queued.result()).images) == 1
            await reader
            assert client.resumes == 1
            assert client.session == client.welcome.session
            check_guarantees([running.id], events)
            # The session goes on: a new job on the new connection.
            assert len((await (await client.submit("after", steps=1)).result()).images) == 1
            # A submit made while the connection is being taken over again (sent on the
            # lost connection, or on the new one) is answered all the same.
            relay.drop()
            during = await client.submit("during", steps=1)
            assert len((await during.result()).images) == 1
            assert client.resumes == 2
        await relay.stop()


async def test_the_python_client_gives_up_after_its_tries_with_connection_lost(
    start_server,
) -> None:
    async with start_server(**ONE_AT_A_TIME) as server:
        relay = TcpRelay(server.port)
        await relay.start()
        client = await connect(relay.url(server.ws_url), resume_tries=3, resume_backoff=0.05)
        running = await client.submit("running", **RUNNING)
        async with asyncio.timeout(60):
            while running.started is None:
                await asyncio.sleep(0.01)
        await relay.stop()  # the connection is lost and nothing answers any more
        with pytest.raises(ConnectionLost, match="could not be resumed"):
            await running.result()
        assert client.closed and client.resumes == 0
        await client.close()
        # The server still has the session for its window.
        assert [s.id for s in server.resumes.detached_sessions()] == [client.session]


async def test_a_resumable_client_that_does_not_read_is_detached_not_ended(start_server) -> None:
    """A send timeout closes the connection (1008) but keeps the session for a resume: the
    client may be on a network that died."""
    async with start_server(send_timeout=1.0, **ONE_AT_A_TIME) as server:
        stalled = await open_stalled_client(server, query="?resumable=1")
        session = stalled.session
        token = (await stalled.resume()).welcome.resume_token  # reads welcome, nothing more
        await stalled.submit("big", **BIG)
        await stalled.submit("next", steps=2)
        await wait_for(lambda: session not in server.sessions, timeout=15)
        assert "latentcast_slow_client_disconnects_total 1.0" in server.metrics.render().decode()
        assert session in server.resumes.detached_sessions()
        assert not session.buffer.closed
        second = await open_client(resume_url(server, token, 0))
        assert second.welcome.resumed is True
        await second.ended("next")
        check_guarantees(["big", "next"], second.received, seq=True)
        assert second.received[0].seq == 1, "after=0: everything kept comes again"
        await second.close()
        await stalled.close()


async def test_tokens_never_reach_the_log(start_server, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="latentcast")
    async with start_server() as server:
        first = await open_client(server.ws_url + "?resumable=1")
        await first.submit("one", steps=1)
        await first.job_messages("one")
        await drop(first)
        second = await open_client(resume_url(server, first.welcome.resume_token, 1))
        assert second.welcome.resumed is True
        refused = await open_client(resume_url(server, first.welcome.resume_token, 1))
        assert refused.welcome.resumed is False
        await second.close()
        await refused.close()
    tokens = [first.welcome.resume_token, second.welcome.resume_token]
    tokens.append(refused.welcome.resume_token)
    assert "resumed" in caplog.text
    for token in tokens:
        assert token is not None and token not in caplog.text


async def test_a_python_client_can_ask_for_an_ordinary_session(start_server) -> None:
    async with start_server() as server, connect(server.ws_url, resumable=False) as client:
        assert client.welcome.resume_token is None
        job = await client.submit("plain", steps=1)
        assert len((await job.result()).images) == 1


async def test_a_coalesced_message_never_sent_uses_no_seq(start_server) -> None:
    """The seq is given as the writer takes a message: a reader that lags gets fewer
    progress messages (latest wins), and their numbers still have no gaps."""
    async with start_server(send_timeout=120, **ONE_AT_A_TIME) as server:
        stalled = await open_stalled_client(server, query="?resumable=1")
        # Two big results: the client's side takes in the first whole (one frame), the
        # second blocks the server's writer (tests/support.py, open_stalled_client).
        await stalled.submit("big-1", **BIG)
        await stalled.submit("big-2", **BIG)
        await stalled.submit("steps", steps=20, preview={"kind": "latent"})
        session = stalled.session
        complete = 'latentcast_jobs_total{outcome="complete"} 3.0'
        await wait_for(lambda: complete in server.metrics.render().decode())  # none read
        assert session.buffer.reliable_backlog > 0, "the writer was blocked meanwhile"
        late = await stalled.resume()
        messages = await late.recv_until(lambda m: is_terminal(m, "steps"))
        progress = [m for m in messages if isinstance(m, Progress) and m.id == "steps"]
        assert len(progress) < 20, "progress messages were coalesced"
        assert [m.seq for m in messages] == list(range(1, len(messages) + 1))
        check_guarantees(["big-1", "big-2", "steps"], messages, seq=True)
        await late.close()


async def test_the_python_client_told_resumed_false_fails_its_jobs(start_server) -> None:
    async with start_server(resume_window=0.3, **ONE_AT_A_TIME) as server:
        relay = TcpRelay(server.port)
        await relay.start()
        client = await connect(relay.url(server.ws_url), resume_tries=10, resume_backoff=0.1)
        running = await client.submit("running", **RUNNING)
        async with asyncio.timeout(60):
            while running.started is None:
                await asyncio.sleep(0.01)
        await relay.stop()  # lost, and refused while the window passes
        await wait_for(lambda: not server.scheduler.unfinished)  # the session ended
        await relay.start()  # the next try reaches the server: resumed:false
        with pytest.raises(ConnectionLost, match="no longer has the session"):
            await running.result()
        assert client.closed and client.resumes == 0
        await client.close()
        await relay.stop()
