"""Failures stay contained: generation_failed ends one job, internal answers one message;
only a dead engine loop is fatal, and then everyone hears it at once.

These are the only tests that inject a fault, since a healthy tiny model never fails: the
engine, scheduler and sessions stay real; one call inside them raises once.
"""

from __future__ import annotations

import asyncio

import pytest

from latentcast.protocol import Draining
from latentcast.server.scheduler import Scheduler
from tests.support import LONG_JOB, is_terminal, open_client, ready_status


async def test_a_failing_job_ends_with_generation_failed_and_the_engine_goes_on(
    start_server,
) -> None:
    async with start_server() as server:
        unet = server.model.pipeline.unet
        original = unet.forward
        calls = {"count": 0}

        def fail_once(*args, **kwargs):
            calls["count"] += 1
            if calls["count"] == 2:
                raise RuntimeError("CUDA out of memory (simulated)")
            return original(*args, **kwargs)

        unet.forward = fail_once
        try:
            client = await open_client(server.ws_url)
            other = await open_client(server.ws_url)
            await client.submit("doomed", steps=3)
            await other.submit("fine", steps=2)
            messages = await client.job_messages("doomed")
            error = messages[-1]
            assert (error.type, error.code, error.id) == ("error", "generation_failed", "doomed")
            assert "out of memory" in error.message
            assert (await other.job_messages("fine"))[-1].type == "complete"
            await client.submit("again", steps=2)
            assert (await client.job_messages("again"))[-1].type == "complete"
        finally:
            unet.forward = original
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
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit("running", **LONG_JOB)
        await client.recv_until(lambda m: m.type == "started")
        await client.submit("waiting", steps=1)
        await client.recv_until(lambda m: m.type == "accepted" and m.id == "waiting")

        async def broken(self):
            raise RuntimeError("simulated engine loop bug")

        monkeypatch.setattr(Scheduler, "next_job", broken)
        await client.send({"type": "cancel", "id": "running"})  # the loop asks for the next job
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
