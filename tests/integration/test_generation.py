"""A job end to end over a real socket: messages, order, images, previews, determinism."""

from __future__ import annotations

import io

import msgpack
import numpy as np
import pytest
from PIL import Image
from websockets.asyncio.client import connect

from latentcast.protocol import (
    Accepted,
    Complete,
    ImagePreview,
    LatentPreview,
    Progress,
    Started,
)
from latentcast.server.engine import diffusers_arguments
from latentcast.server.jobs import GenerationRequest
from latentcast.server.previews import encode_image
from tests.support import ONE_AT_A_TIME, open_client


async def test_welcome_describes_the_model_limits_and_defaults(start_server) -> None:
    async with start_server(max_queue=5, max_jobs_per_session=3) as server:
        client = await open_client(server.ws_url)
        welcome = client.welcome
        assert welcome.protocol == 1
        assert welcome.server.startswith("latentcast/")
        assert welcome.session
        assert welcome.model.name == "tiny"
        assert welcome.model.family == "sd1"
        assert welcome.model.modes == ["txt2img", "img2img", "inpaint"]
        assert welcome.defaults.scheduler in welcome.model.schedulers
        assert welcome.model.latent_channels == 4
        assert welcome.model.vae_scale_factor == 8
        assert welcome.model.latent_rgb is not None
        assert len(welcome.model.latent_rgb.factors) == 4
        assert welcome.limits.max_jobs_per_session == 3
        assert welcome.limits.max_bad_frames == 16
        await client.close()


async def test_welcome_carries_every_field_of_the_contract_on_the_wire(start_server) -> None:
    """Read raw: a client model's defaults must not hide a key the server left out."""
    async with start_server() as server, connect(server.ws_url, compression=None) as ws:
        welcome = msgpack.unpackb(await ws.recv())
        model = welcome["model"]
        assert welcome["models"] == [model], "the default model, first and only"
        assert welcome["features"] == ["batching", "resume"], "batching and resume, no more yet"
        assert welcome["resume_token"] is None and welcome["resumed"] is False
        assert model["controlnets"] == []
        assert welcome["limits"]["max_controls"] == 0
        assert set(welcome["limits"]) == {
            "max_width",
            "max_height",
            "max_steps",
            "max_images",
            "max_prompt_chars",
            "max_jobs_per_session",
            "max_message_bytes",
            "max_bad_frames",
            "max_controls",
        }


async def test_batching_is_announced_only_when_jobs_may_share_steps(start_server) -> None:
    async with start_server(**ONE_AT_A_TIME) as server, connect(server.ws_url) as ws:
        assert msgpack.unpackb(await ws.recv())["features"] == ["resume"]


@pytest.mark.both_engines
async def test_txt2img_streams_in_order_and_completes(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit("j1", steps=3, seed=42, width=64, height=72)
        messages = await client.job_messages("j1")
        assert isinstance(messages[0], Accepted) and messages[0].position == 0
        started = messages[1]
        assert isinstance(started, Started)
        assert (started.seed, started.steps, started.width, started.height) == (42, 3, 64, 72)
        progress = [m for m in messages if isinstance(m, Progress)]
        assert progress, "at least the last progress arrives"
        assert [p.step for p in progress] == sorted(p.step for p in progress)
        assert progress[-1].step == progress[-1].steps == 3
        complete = messages[-1]
        assert isinstance(complete, Complete)
        assert len(complete.images) == 1
        image = complete.images[0]
        assert (image.format, image.width, image.height, image.seed) == ("png", 64, 72, 42)
        decoded = Image.open(io.BytesIO(image.data))
        assert decoded.format == "PNG" and decoded.size == (64, 72)
        assert complete.timings.queued_ms >= 0 and complete.timings.run_ms > 0
        await client.close()


@pytest.mark.both_engines
async def test_server_draws_and_reports_a_seed_when_none_is_given(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit("j1", steps=1)
        messages = await client.job_messages("j1")
        started = next(m for m in messages if isinstance(m, Started))
        assert 0 <= started.seed < 2**32
        assert messages[-1].images[0].seed == started.seed
        await client.close()


async def test_image_is_byte_identical_to_calling_the_pipeline_directly(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit(
            "j1",
            "a red fox",
            steps=4,
            seed=7,
            width=64,
            height=64,
            guidance_scale=7.5,
            negative_prompt="blurry",
            preview={"kind": "latent"},
        )
        complete = (await client.job_messages("j1"))[-1]
        assert isinstance(complete, Complete)
        await client.close()

        assert server.model is not None
        request = GenerationRequest(
            prompt="a red fox",
            negative_prompt="blurry",
            width=64,
            height=64,
            steps=4,
            guidance_scale=7.5,
            seed=7,
            scheduler=client.welcome.defaults.scheduler,
            num_images=1,
        )
        model = server.model

        def direct_call() -> Image.Image:
            model.pipeline.scheduler = model.make_scheduler(request.scheduler)
            return model.pipeline(**diffusers_arguments(request)).images[0]

        # On the engine's own thread: torch's thread count (and so the float rounding of
        # a CPU run) is per thread, and the engine sets its own.
        direct = await server.engine_thread.call(direct_call)
        assert complete.images[0].data == encode_image(direct, "png")


@pytest.mark.both_engines
async def test_same_params_and_seed_give_the_same_image(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit("a", steps=2, seed=5)
        first = (await client.job_messages("a"))[-1]
        await client.submit("b", steps=2, seed=5)
        second = (await client.job_messages("b"))[-1]
        await client.submit("c", steps=2, seed=6)
        other = (await client.job_messages("c"))[-1]
        assert first.images[0].data == second.images[0].data
        assert first.images[0].data != other.images[0].data
        await client.close()


@pytest.mark.both_engines
async def test_num_images_uses_seed_plus_k(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit("batch", steps=2, seed=2**32 - 1, num_images=2)
        batch = (await client.job_messages("batch"))[-1]
        assert [image.seed for image in batch.images] == [2**32 - 1, 0]
        await client.submit("single", steps=2, seed=0)
        single = (await client.job_messages("single"))[-1]
        pixels = [
            np.asarray(Image.open(io.BytesIO(i.data)), dtype=np.int16)
            for i in (batch.images[1], single.images[0])
        ]
        assert np.abs(pixels[0] - pixels[1]).max() <= 2  # "up to rounding"
        await client.close()


@pytest.mark.parametrize(("fmt", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
async def test_output_format_and_quality(start_server, fmt: str, pil_format: str) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.send(
            {
                "type": "submit",
                "id": "j",
                "params": {"prompt": "x", "steps": 1},
                "output": {"format": fmt, "quality": 50},
            }
        )
        complete = (await client.job_messages("j"))[-1]
        assert complete.images[0].format == fmt
        assert Image.open(io.BytesIO(complete.images[0].data)).format == pil_format
        await client.close()


@pytest.mark.both_engines
async def test_latent_previews_every_n_steps_and_never_the_last(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit(
            "j", steps=5, width=64, height=80, preview={"kind": "latent", "every": 2}
        )
        messages = await client.job_messages("j")
        previews = [m for m in messages if isinstance(m, LatentPreview)]
        assert previews, "a reading client gets previews"
        for preview in previews:
            assert preview.step % 2 == 0 and preview.step < 5
            assert preview.shape == (4, 10, 8) and preview.dtype == "float16"
            latent = np.frombuffer(preview.data, dtype="<f2").reshape(preview.shape)
            assert np.isfinite(latent).all()
        steps = [m.step for m in messages if isinstance(m, (Progress, LatentPreview))]
        assert steps == sorted(steps), "step never decreases"
        await client.close()


@pytest.mark.both_engines
async def test_image_previews_respect_format_and_max_side(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit(
            "j",
            steps=3,
            width=128,
            height=64,
            preview={"kind": "image", "format": "webp", "max_side": 8},
        )
        previews = [m for m in await client.job_messages("j") if isinstance(m, ImagePreview)]
        assert previews
        for preview in previews:
            assert preview.format == "webp"
            assert (preview.width, preview.height) == (8, 4)
            assert Image.open(io.BytesIO(preview.data)).size == (8, 4)
        await client.submit("k", steps=2, width=128, height=64, preview={"kind": "image"})
        default = [m for m in await client.job_messages("k") if isinstance(m, ImagePreview)]
        assert [(p.width, p.height, p.format) for p in default] == [(16, 8, "jpeg")]
        await client.close()


async def test_no_previews_unless_asked(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.submit("j", steps=3)
        messages = await client.job_messages("j")
        assert not [m for m in messages if m.type == "preview"]
        await client.close()


async def test_guidance_at_or_below_one_and_integer_floats_are_accepted(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        # JavaScript encoders send 7.0 as 7: float fields take any number.
        await client.send(
            {
                "type": "submit",
                "id": "j",
                "params": {"prompt": "x", "steps": 1, "guidance_scale": 1},
            }
        )
        assert (await client.job_messages("j"))[-1].type == "complete"
        await client.close()


async def test_a_resubmitted_prompt_is_encoded_once_with_the_same_bytes(start_server) -> None:
    """A canvas resubmits one prompt: the text encoder runs for the first job only."""
    job = {"steps": 2, "seed": 11, "guidance_scale": 7.5, "negative_prompt": "blurry"}
    async with start_server() as server:
        assert server.model is not None
        encoder = server.model.pipeline.text_encoder
        calls: list[int] = []
        original = encoder.forward

        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        encoder.forward = counted
        try:
            client = await open_client(server.ws_url)
            images = []
            for k in range(4):
                await client.submit(f"j{k}", "a red fox", **job)
                images.append((await client.job_messages(f"j{k}"))[-1].images[0].data)
            await client.submit("other", "a blue fox", **job)
            await client.job_messages("other")
            await client.close()
        finally:
            del encoder.forward
        # Prompt and negative prompt once for "a red fox", once more for "a blue fox".
        assert len(calls) == 4
        assert len(set(images)) == 1
    async with start_server() as fresh:
        client = await open_client(fresh.ws_url)
        await client.submit("j", "a red fox", **job)
        assert (await client.job_messages("j"))[-1].images[0].data == images[0]
        await client.close()
