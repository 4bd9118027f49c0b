"""Failures stay contained: generation_failed ends one job, internal answers one message.

These are the only tests that inject a fault, since a healthy tiny model never fails: the
engine, scheduler and sessions stay real; one call inside them raises once.
"""

from __future__ import annotations

import pytest

from latentcast.server.scheduler import Scheduler
from tests.support import open_client


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
