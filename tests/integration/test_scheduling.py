"""Fairness, positions and isolation between sessions (PROTOCOL.md 5.1, 5.3, 5.6)."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from latentcast.protocol import Accepted, Queued, Started
from latentcast.server.scheduler import QUEUED_MIN_INTERVAL
from tests.support import LONG_JOB, ONE_AT_A_TIME, Client, is_terminal, open_client


@pytest.mark.both_engines
async def test_a_backlog_does_not_starve_another_session(start_server) -> None:
    # One job at a time, so that the start order is the order of `started`.
    async with start_server(**ONE_AT_A_TIME) as server:
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


@pytest.mark.both_engines
async def test_positions_are_told_and_updated(start_server) -> None:
    async with start_server(**ONE_AT_A_TIME) as server:
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


@pytest.mark.both_engines
async def test_answers_come_in_submit_order_and_sessions_see_only_their_jobs(start_server) -> None:
    async with start_server() as server:
        one = await open_client(server.ws_url)
        two = await open_client(server.ws_url)
        for k in range(3):
            await one.submit(f"same{k}", steps=2, preview={"kind": "latent"})
            await two.submit(f"same{k}", steps=2, preview={"kind": "latent"})
        await one.submit("same0", steps=1)  # duplicate in between: still in order
        await one.submit("last", steps=1)
        # Jobs run together and end in any order: read until each session's last ends.
        got_one = await _until_ended(one, {"same0", "same1", "same2", "last"})
        got_two = await _until_ended(two, {"same0", "same1", "same2"})
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


async def _until_ended(client: Client, ids: set[str]) -> list:
    """Everything ``client`` receives until a job of each id in ``ids`` has ended."""
    ended: set[str] = set()

    def done(message) -> bool:
        # The rejected duplicate "same0" is an error without a job: not an end.
        if is_terminal(message) and not (
            message.type == "error" and message.code == "duplicate_id"
        ):
            ended.add(message.id)
        return ended >= ids

    return await client.recv_until(done)


async def read_for(client: Client, seconds: float) -> None:
    """Read everything that comes for ``seconds`` (so each message's time is its arrival)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            await client.recv(timeout=left)
        except TimeoutError:
            return


@pytest.mark.both_engines
async def test_queued_is_paced_per_job_and_ends_on_the_true_position(start_server) -> None:
    """PROTOCOL.md 4: queued at most once per 250 ms per job, carrying the latest position."""
    waiting, cancelled = 20, 12
    gap = 0.03  # between two cancels: an unpaced server would send queued this often
    async with start_server(max_jobs_per_session=32, **ONE_AT_A_TIME) as server:
        client = await open_client(server.ws_url)
        await client.submit("run", **LONG_JOB)
        await client.recv_until(lambda m: m.type == "started")
        for k in range(waiting):
            await client.submit(f"w{k}", steps=1)
        messages = await client.recv_until(lambda m: m.type == "accepted" and m.id == "w19")
        positions = {m.id: m.position for m in messages if isinstance(m, Accepted)}
        assert positions == {f"w{k}": k for k in range(waiting)}

        # Cancel from the front, one every 30 ms, while reading all the time.
        reader = asyncio.create_task(read_for(client, cancelled * gap + 4 * QUEUED_MIN_INTERVAL))
        start = len(client.timeline)
        for k in range(cancelled):
            await client.send({"type": "cancel", "id": f"w{k}"})
            await asyncio.sleep(gap)
        await reader
        timeline = client.timeline[start:]

        times: dict[str, list[float]] = {}
        last: dict[str, int] = {}
        ended: dict[str, float] = {}
        for at, message in timeline:
            if isinstance(message, Queued):
                assert message.id not in ended, f"queued after {message.id} ended"
                times.setdefault(message.id, []).append(at)
                last[message.id] = message.position
            elif is_terminal(message):
                ended[message.id] = at
        assert set(ended) == {f"w{k}" for k in range(cancelled)}
        # Every job that stayed heard where it ended up.
        assert {f"w{k}": last.get(f"w{k}") for k in range(cancelled, waiting)} == {
            f"w{k}": k - cancelled for k in range(cancelled, waiting)
        }
        # At most one queued per 250 ms per job (less 100 ms for delivery jitter on a
        # loaded machine: unpaced, they would come 30 ms apart).
        gaps = {
            job_id: [round(b - a, 3) for a, b in itertools.pairwise(at)]
            for job_id, at in times.items()
        }
        assert all(g >= QUEUED_MIN_INTERVAL - 0.1 for job in gaps.values() for g in job), gaps
        total = sum(len(at) for at in times.values())
        unpaced = sum(waiting - 1 - k for k in range(cancelled))
        assert total < unpaced / 2, (total, unpaced)

        await client.send({"type": "cancel", "id": "run"})
        await client.recv_until(lambda m: is_terminal(m, f"w{waiting - 1}"))
        await client.close()
