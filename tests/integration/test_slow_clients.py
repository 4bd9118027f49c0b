"""Slow and stalled readers (PROTOCOL.md 5.3, 5.4): never slow the engine or others."""

from __future__ import annotations

import asyncio
import socket
import time

from websockets.asyncio.client import connect

from latentcast.protocol import GenerationParams, PreviewRequest, Submit, encode_message
from tests.support import open_client


async def _stalled_client(server, jobs: int) -> object:
    """A client that submits big jobs and then never reads a byte.

    Each job's result is four 512x512 PNGs (~2.7 MB): two are more than the kernel's
    socket buffers on loopback can absorb, so the server's sends really block.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small: stalls quickly
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    ws = await connect(server.ws_url, sock=sock, max_queue=1, compression=None, max_size=None)
    for k in range(jobs):
        submit = Submit(
            id=f"big{k}",
            params=GenerationParams(
                prompt="noise",
                width=512,
                height=512,
                steps=1,
                seed=k,
                num_images=4,
                guidance_scale=1.0,
            ),
            preview=PreviewRequest(kind="image"),
        )
        await ws.send(encode_message(submit))
    return ws


async def _wait_for(predicate, timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.05)


def _completed(server) -> float:
    for line in server.metrics.render().decode().splitlines():
        if line.startswith('latentcast_jobs_total{outcome="complete"}'):
            return float(line.split()[-1])
    raise AssertionError("no jobs metric")


async def test_a_stalled_reader_does_not_hold_up_the_engine_or_other_sessions(start_server) -> None:
    async with start_server(send_timeout=120) as server:
        stalled = await _stalled_client(server, jobs=3)
        # The engine finishes the stalled client's jobs although nobody reads them ...
        await _wait_for(lambda: _completed(server) >= 3)
        stuck = [s for s in server.sessions if s.buffer.reliable_backlog > 0]
        assert stuck, "the stalled client's messages are waiting in its buffer"
        # ... and a reading client is served as usual meanwhile.
        reader = await open_client(server.ws_url)
        started = time.monotonic()
        await reader.submit("fast", steps=3, preview={"kind": "latent"})
        assert (await reader.job_messages("fast", timeout=30))[-1].type == "complete"
        assert time.monotonic() - started < 30
        assert stuck[0] in server.sessions, "not disconnected before the send timeout"
        await reader.close()
        await stalled.close()


async def test_a_client_that_does_not_read_is_disconnected_after_the_send_timeout(
    start_server,
) -> None:
    async with start_server(send_timeout=1.0) as server:
        stalled = await _stalled_client(server, jobs=3)
        await _wait_for(lambda: any(s.buffer.reliable_backlog for s in server.sessions))
        await _wait_for(lambda: not server.sessions, timeout=30)
        metrics = server.metrics.render().decode()
        assert "latentcast_slow_client_disconnects_total 1.0" in metrics
        # Its unfinished jobs were cancelled, so the engine is free: a new client is served.
        reader = await open_client(server.ws_url)
        await reader.submit("after", steps=1)
        assert (await reader.job_messages("after", timeout=30))[-1].type == "complete"
        await reader.close()
        await stalled.close()


async def test_a_slow_reader_gets_the_latest_droppable_messages_and_every_reliable_one(
    start_server,
) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit("j", steps=30, preview={"kind": "latent"})
        await asyncio.sleep(1.5)  # read nothing while the job streams
        messages = await client.job_messages("j")
        types = [m.type for m in messages]
        assert types[0] == "accepted" and types[1] == "started" and types[-1] == "complete"
        steps = [m.step for m in messages if m.type in ("progress", "preview")]
        assert steps == sorted(steps)
        assert [m for m in messages if m.type == "progress"][-1].step == 30
        await client.close()
