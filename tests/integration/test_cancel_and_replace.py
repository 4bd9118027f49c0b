"""Cancel, replace and disconnect (PROTOCOL.md sections 3 and 5.5, 5.7)."""

from __future__ import annotations

import time

import pytest

from latentcast.protocol import Accepted, Cancelled, Complete, Progress, Started
from tests.support import LONG_JOB, ONE_AT_A_TIME, is_terminal, open_client, wait_for

LONG = LONG_JOB["steps"]


@pytest.mark.both_engines
async def test_cancel_of_a_queued_job_answers_at_once(start_server) -> None:
    async with start_server(**ONE_AT_A_TIME) as server:
        client = await open_client(server.ws_url)
        await client.submit("running", **LONG_JOB)
        await client.submit("queued", steps=1)
        await client.recv_until(lambda m: m.type == "accepted" and m.id == "queued")
        sent = time.monotonic()
        await client.send({"type": "cancel", "id": "queued"})
        cancelled = (await client.job_messages("queued"))[-1]
        assert time.monotonic() - sent < 1.0
        assert isinstance(cancelled, Cancelled)
        assert (cancelled.reason, cancelled.step) == ("client", 0)
        await client.send({"type": "cancel", "id": "running"})
        await client.job_messages("running")
        await client.close()


@pytest.mark.both_engines
async def test_cancel_of_a_running_job_stops_at_the_next_step_and_the_engine_moves_on(
    start_server,
) -> None:
    # One job at a time, so that "next" waits for the cancelled job to leave the engine.
    async with start_server(**ONE_AT_A_TIME) as server:
        client = await open_client(server.ws_url)
        await client.submit("running", **LONG_JOB)
        await client.submit("next", steps=1)
        await client.recv_until(
            lambda m: isinstance(m, Progress) and m.id == "running" and m.step >= 2
        )
        await client.send({"type": "cancel", "id": "running"})
        await client.send({"type": "cancel", "id": "running"})  # a second cancel is ignored
        messages = await client.recv_until(lambda m: is_terminal(m, "next"))
        about_running = [m for m in messages if getattr(m, "id", None) == "running"]
        terminal = [m for m in about_running if is_terminal(m)]
        assert len(terminal) == 1
        cancelled = terminal[0]
        assert isinstance(cancelled, Cancelled) and cancelled.reason == "client"
        assert 2 <= cancelled.step < LONG
        assert about_running[-1] is cancelled, "nothing about a job follows its terminal message"
        assert not [m for m in messages if m.type == "error"], "the second cancel is ignored"
        assert isinstance(messages[-1], Complete)
        await client.close()


@pytest.mark.both_engines
async def test_cancel_of_an_ended_job_is_unknown_job(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit("done", steps=1)
        await client.job_messages("done")
        await client.send({"type": "cancel", "id": "done"})
        error = await client.recv()
        assert (error.type, error.code, error.id) == ("error", "unknown_job", "done")
        # ... and the id may be reused once its job has ended.
        await client.submit("done", steps=1)
        assert (await client.job_messages("done"))[-1].type == "complete"
        await client.close()


@pytest.mark.both_engines
async def test_replacing_a_queued_job_takes_its_place(start_server) -> None:
    async with start_server(**ONE_AT_A_TIME) as server:
        client = await open_client(server.ws_url)
        await client.submit("running", **LONG_JOB)
        await client.recv_until(lambda m: m.type == "started")
        await client.submit("q1", steps=1)
        await client.submit("q2", steps=1)
        await client.submit("q1b", steps=1, replaces="q1")
        messages = await client.recv_until(lambda m: m.type == "accepted" and m.id == "q1b")
        replaced = [m for m in messages if getattr(m, "id", None) == "q1" and is_terminal(m)]
        assert len(replaced) == 1 and isinstance(replaced[0], Cancelled)
        assert (replaced[0].reason, replaced[0].step) == ("replaced", 0)
        accepted = messages[-1]
        assert isinstance(accepted, Accepted) and accepted.position == 0
        await client.send({"type": "cancel", "id": "running"})
        rest = await client.recv_until(lambda m: is_terminal(m, "q2"))
        starts = [m.id for m in rest if isinstance(m, Started)]
        assert starts == ["q1b", "q2"]
        await client.close()


@pytest.mark.both_engines
async def test_replacing_a_running_job_stops_it_at_the_next_step(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit("v1", **LONG_JOB)
        await client.recv_until(lambda m: isinstance(m, Progress) and m.id == "v1")
        await client.submit("v2", steps=1, replaces="v1")
        # With a second engine free, v2 may end before v1 hears of its replacement.
        v1_end, v2_end = await client.ended("v1"), await client.ended("v2")
        assert isinstance(v1_end, Cancelled) and v1_end.reason == "replaced"
        assert v1_end.step < LONG
        assert any(isinstance(m, Accepted) and m.id == "v2" for m in client.received)
        assert isinstance(v2_end, Complete)
        await client.close()


@pytest.mark.both_engines
async def test_replaces_of_an_unknown_or_ended_job_is_accepted(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit("new", steps=1, replaces="never-existed")
        messages = await client.job_messages("new")
        assert isinstance(messages[0], Accepted) and messages[-1].type == "complete"
        await client.close()


@pytest.mark.both_engines
async def test_a_rejected_replacing_submit_leaves_the_named_job_alone(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit("keep", **LONG_JOB)
        await client.recv_until(lambda m: m.type == "started")
        # duplicate_id: the submit is rejected, so "keep" must go on.
        await client.submit("keep", steps=1, replaces="other")
        await client.send(
            {"type": "submit", "id": "x", "replaces": "keep", "params": {"prompt": "p", "steps": 0}}
        )
        errors = await client.recv_until(lambda m: m.type == "error" and m.id == "x")
        assert [m.code for m in errors if m.type == "error"] == ["duplicate_id", "invalid_request"]
        progress = await client.recv_until(lambda m: isinstance(m, Progress) and m.id == "keep")
        assert not any(is_terminal(m, "keep") for m in errors + progress)
        await client.send({"type": "cancel", "id": "keep"})
        assert (await client.job_messages("keep"))[-1].reason == "client"
        await client.close()


@pytest.mark.both_engines
async def test_the_replaced_job_does_not_count_toward_the_limits(start_server) -> None:
    async with start_server(max_jobs_per_session=1, max_queue=1, **ONE_AT_A_TIME) as server:
        client = await open_client(server.ws_url)
        blocker = await open_client(server.ws_url)
        await blocker.submit("block", **LONG_JOB)
        await blocker.recv_until(lambda m: m.type == "started")
        await client.submit("k1", steps=1)
        for k in range(2, 6):  # cancel-and-resubmit, as a live front end does per keystroke
            await client.submit(f"k{k}", steps=1, replaces=f"k{k - 1}")
        messages = await client.recv_until(lambda m: m.type == "accepted" and m.id == "k5")
        assert not [m for m in messages if m.type == "error"]
        ends = {m.id: m.reason for m in messages if isinstance(m, Cancelled)}
        assert ends == {"k1": "replaced", "k2": "replaced", "k3": "replaced", "k4": "replaced"}
        await blocker.send({"type": "cancel", "id": "block"})
        assert (await client.job_messages("k5"))[-1].type == "complete"
        await client.close()
        await blocker.close()


@pytest.mark.both_engines
async def test_a_disconnect_cancels_the_sessions_jobs_and_frees_the_engine(start_server) -> None:
    async with start_server() as server:
        leaver = await open_client(server.ws_url)
        stayer = await open_client(server.ws_url)
        await leaver.submit("long", **LONG_JOB)
        await leaver.submit("queued", **LONG_JOB)
        await leaver.recv_until(lambda m: isinstance(m, Progress))
        await stayer.submit("mine", steps=1)
        await stayer.recv_until(lambda m: m.type == "accepted")
        await leaver.ws.close()
        started = time.monotonic()
        assert (await stayer.job_messages("mine"))[-1].type == "complete"
        assert time.monotonic() - started < 20
        # Both of the leaver's jobs end cancelled (with two engines both were running,
        # and "mine" may finish before the second one's step boundary).
        cancelled = 'latentcast_jobs_total{outcome="cancelled"} 2.0'
        await wait_for(lambda: cancelled in server.metrics.render().decode(), timeout=20)
        await stayer.close()
