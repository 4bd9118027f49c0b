"""The Python client against a real server over real sockets (latentcast.client)."""

from __future__ import annotations

import asyncio
import io

import pytest
from PIL import Image

from latentcast.client import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionLost,
    JobCancelled,
    JobFailed,
    RequestRejected,
    connect,
    generate,
)
from latentcast.protocol import (
    Accepted,
    Cancelled,
    Complete,
    LatentPreview,
    Progress,
    Started,
)
from tests.support import LONG_JOB

LONG = LONG_JOB["steps"]
TIMEOUT = 30.0


def _png(size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (40, 90, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


async def _until_running(job, step: int = 1) -> None:
    async with asyncio.timeout(TIMEOUT):
        while job.progress is None or job.progress.step < step:
            await asyncio.sleep(0.01)


async def test_submit_streams_events_in_order_and_the_result_decodes(start_server) -> None:
    async with start_server() as server, connect(server.ws_url) as client:
        assert client.welcome.protocol == 1 and client.welcome.model.latent_rgb is not None
        job = await client.submit("a red fox", steps=4, seed=42, preview="latent", num_images=2)
        assert job.id and job.position == 0
        events = []
        async with asyncio.timeout(TIMEOUT):
            async for event in job:
                events.append(event)
        assert isinstance(events[0], Accepted) and isinstance(events[-1], Complete)
        started = [i for i, event in enumerate(events) if isinstance(event, Started)]
        assert len(started) == 1
        assert all(event.type in ("accepted", "queued") for event in events[: started[0]])
        steps = [event.step for event in events if isinstance(event, Progress | LatentPreview)]
        assert steps == sorted(steps) and steps[-1] == 4
        assert all(event.id == job.id for event in events)
        previews = [event for event in events if isinstance(event, LatentPreview)]
        assert previews and client.preview_to_pil(previews[0]).size == (8, 8)

        result = await job.result()
        assert job.status == "complete" and job.id not in client.jobs
        assert [image.seed for image in result.images] == [42, 43]
        for image in result.images:
            picture = image.to_pil()
            assert (picture.format, picture.size) == ("PNG", (image.width, image.height))
        assert result.timings.run_ms >= 0 and result.started.seed == 42


async def test_cancel_ends_the_job_with_job_cancelled_client(start_server) -> None:
    async with start_server() as server, connect(server.ws_url) as client:
        job = await client.submit("long", **LONG_JOB)
        await _until_running(job)
        await job.cancel()
        with pytest.raises(JobCancelled) as cancelled:
            async with asyncio.timeout(TIMEOUT):
                await job.result()
        assert cancelled.value.reason == "client" and cancelled.value.step < LONG
        terminal = [event async for event in job][-1]
        assert isinstance(terminal, Cancelled) and terminal.reason == "client"

        # replace(): the running job is cancelled as "replaced", the new one runs.
        first = await client.submit("v1", **LONG_JOB)
        await _until_running(first)
        second = await client.replace(first, "v2", steps=2)
        with pytest.raises(JobCancelled) as replaced:
            await first.result()
        assert replaced.value.reason == "replaced"
        assert (await second.result()).images
        assert second.request.replaces == first.id


async def test_rejected_submits_raise_request_rejected_with_code_and_field(start_server) -> None:
    async with start_server(max_jobs_per_session=1) as server, connect(server.ws_url) as client:
        # Checked here with the server's own rules, without a round trip ...
        with pytest.raises(RequestRejected) as local:
            await client.submit("x", width=100)
        assert (local.value.code, local.value.field, local.value.local) == (
            "invalid_request",
            "params.width",
            True,
        )
        with pytest.raises(RequestRejected) as scheduler:
            await client.submit("x", scheduler="nope")
        assert scheduler.value.field == "params.scheduler"
        # ... and answered by the server.
        with pytest.raises(RequestRejected) as bad_image:
            await client.submit("x", init_image=b"not an image")
        assert (bad_image.value.code, bad_image.value.field) == ("bad_image", None)
        assert bad_image.value.local is False

        running = await client.submit("long", **LONG_JOB, id="mine")
        with pytest.raises(RequestRejected) as duplicate:
            await client.submit("again", id="mine")
        assert duplicate.value.code == "duplicate_id"
        with pytest.raises(RequestRejected) as too_many:
            await client.submit("second", steps=1)
        assert (too_many.value.code, too_many.value.local) == ("too_many_jobs", False)
        assert set(client.jobs) == {"mine"}, "rejected submits leave nothing behind"
        await running.cancel()
        with pytest.raises(JobCancelled):
            await running.result()


async def test_two_concurrent_jobs_get_only_their_own_events(start_server) -> None:
    async with start_server() as server, connect(server.ws_url) as client:
        one, two = await asyncio.gather(
            client.submit("one", steps=3, preview="latent"),
            client.submit("two", steps=3, preview="latent"),
        )
        assert one.id != two.id

        async def read(job) -> list:
            return [event async for event in job]

        async with asyncio.timeout(TIMEOUT):
            events_one, events_two = await asyncio.gather(read(one), read(two))
        for job, events in ((one, events_one), (two, events_two)):
            assert {event.id for event in events} == {job.id}
            assert events[0].type == "accepted" and events[-1].type == "complete"
            assert sum(event.type == "started" for event in events) == 1
        assert client.jobs == {}


async def test_a_lagging_reader_gets_the_latest_droppable_events_and_every_other(
    start_server,
) -> None:
    async with start_server() as server, connect(server.ws_url) as client:
        job = await client.submit("slow reader", steps=8, preview="latent")
        await job.result()  # read nothing until the end
        events = [event async for event in job]
        types = [event.type for event in events]
        assert types[0] == "accepted" and types[-1] == "complete"
        assert types.count("started") == 1
        assert types.count("progress") == 1 and types.count("preview") <= 1
        progress = next(event for event in events if isinstance(event, Progress))
        assert progress.step == progress.steps == 8


async def test_a_lost_connection_fails_every_unfinished_job(start_server) -> None:
    async with start_server() as server:
        client = await connect(server.ws_url)
        running = await client.submit("running", **LONG_JOB)
        queued = await client.submit("queued", **LONG_JOB)
        await _until_running(running)
        reader_events = []

        async def read() -> None:
            async for event in running:
                reader_events.append(event)

        reader = asyncio.create_task(read())
        await server.close()  # no drain: connections close under the jobs
        async with asyncio.timeout(TIMEOUT):
            for job in (running, queued):
                with pytest.raises(ConnectionLost) as lost:
                    await job.result()
                assert lost.value.code == 1001
                assert job.status == "lost"
            with pytest.raises(ConnectionLost):
                await reader
        assert reader_events and reader_events[0].type == "accepted"
        assert client.closed and client.jobs == {}
        with pytest.raises(ConnectionLost):
            await client.submit("after")
        await client.close()


async def test_draining_is_announced_and_the_deadline_ends_jobs(start_server) -> None:
    async with start_server(drain_timeout=0.5) as server:
        async with connect(server.ws_url) as client:
            job = await client.submit("running", **LONG_JOB)
            await _until_running(job)
            drain = asyncio.create_task(server.drain())
            async with asyncio.timeout(TIMEOUT):
                await client.draining.wait()
                assert client.drain_deadline is not None
                with pytest.raises(JobFailed) as failed:
                    await job.result()
                assert failed.value.code == "shutdown"
                lost = await client.wait_closed()
            assert lost.code == 1001
            await drain


async def test_tokens_are_sent_as_bearer_and_refusals_are_typed(start_server) -> None:
    async with start_server(tokens=("t",)) as server:
        url = server.ws_url
        with pytest.raises(AuthenticationFailed) as missing:
            await connect(server.ws_url)
        assert missing.value.status == 401
        with pytest.raises(AuthenticationFailed):
            await connect(server.ws_url, token="wrong")
        async with connect(server.ws_url, token="t") as client:
            job = await client.submit("authorized", steps=1)
            assert len((await job.result()).images) == 1
    with pytest.raises(ConnectFailed) as unreachable:
        await connect(url, open_timeout=5)  # the server is gone
    assert unreachable.value.status is None


async def test_the_sync_generate_helper(start_server) -> None:
    async with start_server() as server:
        result = await asyncio.to_thread(
            generate, server.ws_url, "a lighthouse", steps=2, seed=7, output_format="webp"
        )
        assert result.images[0].seed == 7
        assert result.images[0].to_pil().format == "WEBP"
        with pytest.raises(RequestRejected):
            await asyncio.to_thread(generate, server.ws_url, "x", steps=0)
        with pytest.raises(RuntimeError, match="own event loop"):
            generate(server.ws_url, "inside a loop")


async def test_jobs_choose_a_model_by_name(start_server) -> None:
    """Feature "models": submit(model=...), model_info, the chosen model's previews."""
    async with start_server(model=("sd=tiny", "xl=tiny-sdxl")) as server:
        async with connect(server.ws_url) as client:
            assert "models" in client.welcome.features
            assert client.model_info().name == "sd" and client.model_info("xl").family == "sdxl"
            with pytest.raises(KeyError, match="nope"):
                client.model_info("nope")
            job = await client.submit("a fox", model="xl", steps=2, seed=3, preview="latent")
            previews = []
            async with asyncio.timeout(TIMEOUT):
                async for event in job:
                    if isinstance(event, LatentPreview):
                        previews.append(event)
            xl = await job.result()
            assert previews and client.preview_to_pil(previews[0], "xl").size == (8, 8)
            sd = await (await client.submit("a fox", model="sd", steps=2, seed=3)).result()
            assert xl.images[0].data != sd.images[0].data
            with pytest.raises(RequestRejected) as unknown:
                await client.submit("x", model="nope")
            assert (unknown.value.field, unknown.value.local) == ("params.model", True)
        again = await asyncio.to_thread(
            generate, server.ws_url, "a fox", model="xl", steps=2, seed=3
        )
        assert again.images[0].data == xl.images[0].data
