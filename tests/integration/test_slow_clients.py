"""Slow and stalled readers (PROTOCOL.md 5.3, 5.4): never slow the engine or others.

A stalled client (``open_stalled_client``) has tiny socket buffers on both ends of its
connection, so one ``complete`` of four 128x128 PNGs (~170 KB of noise) blocks the
server's writer for that session until the client reads: the tests wait for that state
(server-side), never for a time.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from latentcast.protocol import Complete, LatentPreview, Progress
from latentcast.server.jobs import StopReason
from tests.support import (
    LONG_JOB,
    ONE_AT_A_TIME,
    engine_hold,
    open_client,
    open_stalled_client,
    wait_for,
)

#: One job whose result alone is far more than a stalled connection can absorb.
BIG = {"width": 128, "height": 128, "num_images": 4, "steps": 2, "guidance_scale": 1.0}


def _metric(server, name: str) -> float:
    for line in server.metrics.render().decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"no metric {name}")


def _completed(server) -> float:
    return _metric(server, 'latentcast_jobs_total{outcome="complete"}')


async def _run_unread(server, stalled, job_id: str, **params) -> None:
    """Submit a job for ``stalled`` and wait until its ``complete`` is in the buffer."""
    done = _completed(server)
    await stalled.submit(job_id, **params)
    await wait_for(lambda: _completed(server) > done)  # counted after complete is put


async def _stall(server, stalled, job_id: str) -> None:
    """Run a big job and see that its ``complete`` blocks the session's writer."""
    await _run_unread(server, stalled, job_id, **BIG, preview={"kind": "image"})
    assert stalled.session.buffer.reliable_backlog > 0, "the writer is blocked on the result"


@pytest.mark.both_engines
async def test_a_stalled_reader_does_not_hold_up_the_engine_or_other_sessions(start_server) -> None:
    async with start_server(send_timeout=120) as server:
        stalled = await open_stalled_client(server)
        for k in range(3):
            await stalled.submit(f"big{k}", **BIG, seed=k, preview={"kind": "image"})
        # The engine finishes the stalled client's jobs although nobody reads them ...
        await wait_for(lambda: _completed(server) >= 3)
        assert stalled.session.buffer.reliable_backlog > 0, "its results wait in its buffer"
        # ... and a reading client is served as usual meanwhile.
        reader = await open_client(server.ws_url)
        started = time.monotonic()
        await reader.submit("fast", steps=3, preview={"kind": "latent"})
        assert (await reader.job_messages("fast", timeout=30))[-1].type == "complete"
        assert time.monotonic() - started < 30
        assert stalled.session.buffer.reliable_backlog > 0, "still stalled while it was served"
        # Stalled for longer than the stall watcher's period (1 s), far less than the send
        # timeout (120 s): still connected.
        buffer = stalled.session.buffer
        await wait_for(lambda: buffer.closed or buffer.oldest_unsent_age() > 2.5)
        assert not buffer.closed, "not disconnected before the send timeout"
        assert stalled.session in server.sessions
        # Nothing was lost: once it reads, every result is there.
        late = await stalled.resume()
        for k in range(3):
            complete = (await late.job_messages(f"big{k}"))[-1]
            assert isinstance(complete, Complete)
            assert [(i.width, i.height) for i in complete.images] == [(128, 128)] * 4
        await reader.close()
        await late.close()


async def test_a_client_that_does_not_read_is_disconnected_after_the_send_timeout(
    start_server,
) -> None:
    # One job at a time. The engine runs "big", whose result stalls the writer, then
    # "block", another session's job (a session that has had none started goes first,
    # PROTOCOL.md 5.6), so "long" is still waiting when the send timeout ends the session,
    # whatever the speed.
    async with start_server(send_timeout=1.0, **ONE_AT_A_TIME) as server:
        stalled = await open_stalled_client(server)
        session = stalled.session
        blocker = await open_client(server.ws_url)
        async with engine_hold(server):  # all three wait until they are queued
            await stalled.submit("big", **BIG)
            await stalled.submit("long", steps=5)
            await wait_for(lambda: {"big", "long"} <= session.jobs.keys())
            await blocker.submit("block", **LONG_JOB)
            await blocker.recv_until(lambda m: m.type == "accepted")
        big, long = session.jobs["big"], session.jobs["long"]
        await wait_for(lambda: big.outcome is not None)
        assert big.outcome == "complete"
        assert session.buffer.reliable_backlog > 0, "the writer is blocked on big's result"
        # Gone soon after the send timeout (1 s; checked every 0.25 s), not at the next
        # keepalive ping (20 s after connecting): the close cannot wait for a client that
        # does not read.
        await wait_for(lambda: session not in server.sessions, timeout=15)
        assert session.buffer.closed
        metrics = server.metrics.render().decode()
        assert "latentcast_slow_client_disconnects_total 1.0" in metrics
        # Its unfinished job was cancelled (before it ran) ...
        await wait_for(lambda: long.outcome is not None)
        assert (long.outcome, long.stop_reason, long.step) == (
            "cancelled",
            StopReason.DISCONNECT,
            0,
        )
        # ... and once the engine is free, a new client is served.
        await blocker.send({"type": "cancel", "id": "block"})
        assert (await blocker.job_messages("block"))[-1].type == "cancelled"
        reader = await open_client(server.ws_url)
        await reader.submit("after", steps=1)
        assert (await reader.job_messages("after", timeout=30))[-1].type == "complete"
        await reader.close()
        await blocker.close()
        await stalled.close()


@pytest.mark.both_engines
async def test_a_slow_reader_gets_the_latest_droppable_messages_and_every_reliable_one(
    start_server,
) -> None:
    steps = 20
    async with start_server() as server:
        stalled = await open_stalled_client(server)
        await _stall(server, stalled, "filler")
        # Every message about "j" is put while the writer is blocked on filler's result.
        await _run_unread(server, stalled, "j", steps=steps, seed=1, preview={"kind": "latent"})
        assert stalled.session.buffer.reliable_backlog > 0, "still blocked when j ended"
        client = await stalled.resume()
        filler = await client.job_messages("filler")
        assert filler[-1].type == "complete" and len(filler[-1].images) == 4
        messages = await client.job_messages("j")
        types = [m.type for m in messages]
        # Every reliable message, in order.
        assert [t for t in types if t not in ("progress", "preview")] == [
            "accepted",
            "started",
            "complete",
        ]
        # Droppable ones coalesced, latest wins: one progress (the last step) and one
        # preview (the last one due, step < steps), instead of 20 and 19.
        progress = [m.step for m in messages if isinstance(m, Progress)]
        previews = [m.step for m in messages if isinstance(m, LatentPreview)]
        assert progress == [steps]
        assert previews == [steps - 1]
        # A replaced message goes to the back: steps never decrease in what is received.
        both = [m.step for m in messages if m.type in ("progress", "preview")]
        assert both == sorted(both)
        await client.close()


@pytest.mark.both_engines
async def test_a_send_timeout_disconnect_frees_the_connection_slot_within_5_s(
    start_server,
) -> None:
    """PROTOCOL.md 5.4: gone within 5 s of the decision, no longer counted."""
    async with start_server(send_timeout=1.0, max_connections=2) as server:
        stalled = [await open_stalled_client(server) for _ in range(2)]
        for k, client in enumerate(stalled):
            await _stall(server, client, f"filler{k}")
        refused = await asyncio.to_thread(_handshake_status, server)
        assert refused == 503, "two connections fill the server"
        decided: dict[int, float] = {}
        gone: dict[int, float] = {}

        def watch() -> bool:
            now = time.monotonic()
            for k, client in enumerate(stalled):
                if client.session.buffer.closed:  # the disconnect decision closes it first
                    decided.setdefault(k, now)
                if client.session not in server.sessions:
                    gone.setdefault(k, now)
            return len(gone) == 2

        async with asyncio.timeout(30):
            while not watch():
                await asyncio.sleep(0.01)
        for k in range(2):
            assert gone[k] - decided[k] < 5.0, f"slot {k} held {gone[k] - decided[k]:.1f} s"
            transport = stalled[k].session.connection.transport
            assert transport.is_closing(), "the TCP connection itself is gone"
        assert _metric(server, "latentcast_connections") == 0
        assert _metric(server, "latentcast_slow_client_disconnects_total") == 2
        # The slots are free: a new client connects and is served.
        reader = await open_client(server.ws_url)
        await reader.submit("after", steps=1)
        assert (await reader.job_messages("after", timeout=30))[-1].type == "complete"
        await reader.close()
        for client in stalled:
            await client.close()


def _handshake_status(server) -> int:
    """The HTTP status of a WebSocket handshake with ``server`` (blocking: in a thread)."""
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        connection.request(
            "GET",
            "/v1/ws",
            headers={
                "Upgrade": "websocket",
                "Connection": "Upgrade",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                "Sec-WebSocket-Version": "13",
            },
        )
        return connection.getresponse().status
    finally:
        connection.close()
