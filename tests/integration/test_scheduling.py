"""Fairness, positions and isolation between sessions (PROTOCOL.md 5.1, 5.3, 5.6)."""

from __future__ import annotations

import asyncio

from latentcast.protocol import Accepted, Queued, Started
from tests.support import LONG_JOB, is_terminal, open_client


async def test_a_backlog_does_not_starve_another_session(start_server) -> None:
    async with start_server() as server:
        busy = await open_client(server.ws_url)
        late = await open_client(server.ws_url)
        for k in range(4):
            await busy.submit(f"b{k}", steps=8)
        await busy.recv_until(lambda m: m.type == "accepted" and m.id == "b3")
        await late.submit("l0", steps=8)
        accepted = (await late.recv_until(lambda m: m.type == "accepted"))[-1]
        # b0 is running or about to start; the late session goes right after it.
        assert accepted.position <= 1
        await asyncio.gather(
            late.job_messages("l0"), busy.recv_until(lambda m: is_terminal(m, "b3"))
        )
        timeline = sorted(busy.timeline + late.timeline, key=lambda entry: entry[0])
        order = [m.id for _, m in timeline if isinstance(m, Started)]
        assert order.index("l0") <= 1, order
        assert [job for job in order if job.startswith("b")] == ["b0", "b1", "b2", "b3"]
        await busy.close()
        await late.close()


async def test_positions_are_told_and_updated(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit("run", **LONG_JOB)
        await client.recv_until(lambda m: m.type == "started")
        for k in range(3):
            await client.submit(f"w{k}", steps=1)
        messages = await client.recv_until(lambda m: m.type == "accepted" and m.id == "w2")
        positions = {m.id: m.position for m in messages if isinstance(m, Accepted)}
        assert positions == {"w0": 0, "w1": 1, "w2": 2}
        await client.send({"type": "cancel", "id": "w0"})
        messages = await client.recv_until(
            lambda m: isinstance(m, Queued) and m.id == "w2" and m.position == 1
        )
        assert any(isinstance(m, Queued) and m.id == "w1" and m.position == 0 for m in messages)
        await client.send({"type": "cancel", "id": "run"})
        await client.recv_until(lambda m: is_terminal(m, "w2"))
        await client.close()


async def test_answers_come_in_submit_order_and_sessions_see_only_their_jobs(start_server) -> None:
    async with start_server() as server:
        one = await open_client(server.ws_url)
        two = await open_client(server.ws_url)
        for k in range(3):
            await one.submit(f"same{k}", steps=2, preview={"kind": "latent"})
            await two.submit(f"same{k}", steps=2, preview={"kind": "latent"})
        await one.submit("same0", steps=1)  # duplicate in between: still in order
        await one.submit("last", steps=1)
        got_one = await one.recv_until(lambda m: is_terminal(m, "last"))
        got_two = await two.recv_until(lambda m: is_terminal(m, "same2"))
        answers = [(m.type, m.id) for m in got_one if m.type in ("accepted", "error")]
        assert answers == [
            ("accepted", "same0"),
            ("accepted", "same1"),
            ("accepted", "same2"),
            ("error", "same0"),
            ("accepted", "last"),
        ]
        # Each session's jobs end exactly once, and the other session's never show up.
        for got, ids in (
            (got_one, {"same0", "same1", "same2", "last"}),
            (got_two, {"same0", "same1", "same2"}),
        ):
            ends = [m.id for m in got if is_terminal(m)]
            assert sorted(ends) == sorted(ids)
        seeds_one = {m.id: m.seed for m in got_one if isinstance(m, Started)}
        seeds_two = {m.id: m.seed for m in got_two if isinstance(m, Started)}
        assert seeds_one.keys() == {"same0", "same1", "same2", "last"}
        assert seeds_two.keys() == {"same0", "same1", "same2"}
        await one.close()
        await two.close()
