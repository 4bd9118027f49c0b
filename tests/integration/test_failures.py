"""Failures stay contained: generation_failed ends one job, internal answers one message;
only a dead engine loop is fatal, and then everyone hears it at once.

These are the only tests that inject a fault, since a healthy tiny model never fails: the
engine, scheduler and sessions stay real; one call inside them raises once.
"""

from __future__ import annotations

import asyncio

import pytest

from latentcast.protocol import Complete, Draining
from latentcast.server.scheduler import Scheduler
from tests.support import (
    BATCH_ROUNDING,
    LONG_JOB,
    ONE_AT_A_TIME,
    engine_hold,
    is_terminal,
    largest_difference,
    open_client,
    ready_status,
)


def _fail_unet_calls_of(unet, rows: int, message: str):
    """Make ``unet`` raise for every call of at least ``rows`` rows; returns the undo."""
    original = unet.forward
    calls: list[int] = []

    def forward(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        if sample.shape[0] >= rows:
            raise RuntimeError(message)
        return original(sample, *args, **kwargs)

    unet.forward = forward

    def undo() -> list[int]:
        unet.forward = original
        return calls

    return undo


async def test_a_failed_batched_step_is_run_again_in_smaller_batches(start_server) -> None:
    """Two 2-row jobs share a step; every call of 4 rows fails (say, out of memory):
    each job's step is made again on its own and both complete, as they would alone."""
    async with start_server() as server:
        one = await open_client(server.ws_url)
        two = await open_client(server.ws_url)
        request = {"steps": 3, "guidance_scale": 7.5, "seed": 11}
        await one.submit("alone", **request)
        alone = (await one.job_messages("alone"))[-1]
        undo = _fail_unet_calls_of(server.model.pipeline.unet, 4, "CUDA out of memory (simulated)")
        try:
            # Held at a step boundary, so that both join the engine in the same round.
            async with engine_hold(server):
                await one.submit("a", **request)
                await two.submit("b", **request)
                await one.recv_until(lambda m: m.type == "accepted")
                await two.recv_until(lambda m: m.type == "accepted")
            a = (await one.job_messages("a"))[-1]
            b = (await two.job_messages("b"))[-1]
        finally:
            calls = undo()
        assert isinstance(a, Complete) and isinstance(b, Complete)
        assert 4 in calls and calls.count(2) >= 6, calls
        # Each step run alone after the failed call (the decode is shared): as a lone run,
        # up to rounding.
        for image in (a.images[0].data, b.images[0].data):
            assert largest_difference(image, alone.images[0].data) <= BATCH_ROUNDING
        metrics = server.metrics.render().decode()
        assert 'latentcast_jobs_total{outcome="failed"} 0.0' in metrics
        await one.close()
        await two.close()


async def test_a_job_that_fails_alone_ends_with_generation_failed_and_the_engine_goes_on(
    start_server,
) -> None:
    """A 3-row job fails in every UNet call (its own too); the 1-row job beside it
    completes, and so does the next job."""
    async with start_server() as server:
        client = await open_client(server.ws_url)
        other = await open_client(server.ws_url)
        undo = _fail_unet_calls_of(server.model.pipeline.unet, 3, "CUDA out of memory (simulated)")
        try:
            await client.submit("doomed", steps=3, num_images=3, guidance_scale=1.0)
            await other.submit("fine", steps=2, guidance_scale=1.0)
            messages = await client.job_messages("doomed")
            error = messages[-1]
            assert (error.type, error.code, error.id) == ("error", "generation_failed", "doomed")
            assert "out of memory" in error.message
            assert (await other.job_messages("fine"))[-1].type == "complete"
        finally:
            undo()
        await client.submit("again", steps=2)
        assert (await client.job_messages("again"))[-1].type == "complete"
        metrics = server.metrics.render().decode()
        assert 'latentcast_jobs_total{outcome="failed"} 1.0' in metrics
        await client.close()
        await other.close()


async def test_an_unexpected_error_is_answered_with_internal_and_the_session_goes_on(
    start_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with start_server() as server:
        original = Scheduler.submit
        calls = {"count": 0}

        def fail_once(self, job, **kwargs):
            calls["count"] += 1
            if calls["count"] == 1:
                raise RuntimeError("simulated bug")
            return original(self, job, **kwargs)

        monkeypatch.setattr(Scheduler, "submit", fail_once)
        client = await open_client(server.ws_url)
        await client.submit("first", steps=1)
        error = await client.recv()
        assert (error.type, error.code, error.id) == ("error", "internal", "first")
        await client.submit("second", steps=1)
        assert (await client.job_messages("second"))[-1].type == "complete"
        # The refused job left nothing behind: its id is free again.
        await client.submit("first", steps=1)
        assert (await client.job_messages("first"))[-1].type == "complete"
        await client.close()


async def test_a_dead_engine_loop_is_fatal_and_said_to_everyone_at_once(
    start_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not one job's failure: the loop that feeds the engine itself raises."""
    # One job at a time, so that "waiting" waits.
    async with start_server(**ONE_AT_A_TIME) as server:
        client = await open_client(server.ws_url)
        await client.submit("running", **LONG_JOB)
        await client.recv_until(lambda m: m.type == "started")
        await client.submit("waiting", steps=1)
        await client.recv_until(lambda m: m.type == "accepted" and m.id == "waiting")

        def broken(self):
            raise RuntimeError("simulated engine loop bug")

        # The embedded engine's loop reads the waiting jobs in order (models.py: a job
        # whose model is not loaded lets the next one pass).
        monkeypatch.setattr(Scheduler, "waiting_in_order", broken)
        await client.send({"type": "cancel", "id": "running"})  # the loop looks for the next job
        messages = await client.recv_until(lambda m: is_terminal(m, "waiting"))
        error = messages[-1]
        assert (error.type, error.code) == ("error", "internal")
        assert "engine stopped" in error.message and "simulated engine loop bug" in error.message
        assert server.engine_error is not None
        assert server.exit_status == 1
        status, body = await asyncio.to_thread(ready_status, server.http_url)
        assert (status, body) == (503, {"ready": False, "reason": "draining"})
        # The server shuts itself down: told, then closed.
        async with asyncio.timeout(10):
            await server.wait_stop_requested()
        drain = asyncio.create_task(server.drain())
        await client.recv_until(lambda m: isinstance(m, Draining))
        await drain
        assert client.ws.close_code == 1001
