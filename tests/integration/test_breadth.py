"""Every request field end to end on tiny (SD 1.x) and tiny-sdxl, over real sockets."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from latentcast.protocol import Complete, ImagePreview, Progress, Started
from tests.support import (
    BATCH_ROUNDING,
    ONE_AT_A_TIME,
    is_terminal,
    largest_difference,
    metric_samples,
    open_client,
)

MODELS = ["tiny", "tiny-sdxl"]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


async def run(client, job_id: str, **fields) -> list:
    message = {"type": "submit", "id": job_id, "params": {"prompt": "a cat", "steps": 2, "seed": 1}}
    for key in ("preview", "output", "replaces"):
        if key in fields:
            message[key] = fields.pop(key)
    message["params"].update(fields)
    await client.send(message)
    return await client.job_messages(job_id)


@pytest.fixture(params=MODELS)
def model_name(request) -> str:
    return request.param


async def test_welcome_reports_the_family_modes_and_schedulers(start_server, model_name) -> None:
    async with start_server(model=model_name) as server:
        client = await open_client(server.ws_url)
        model = client.welcome.model
        assert model.family == {"tiny": "sd1", "tiny-sdxl": "sdxl"}[model_name]
        assert model.modes == ["txt2img", "img2img", "inpaint"]
        for name in ("euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "lcm"):
            assert name in model.schedulers
        assert model.latent_rgb is not None and len(model.latent_rgb.factors) == 4
        await client.close()


async def test_sd1_and_sdxl_latent_rgb_factors_differ(start_server) -> None:
    factors = {}
    for name in MODELS:
        async with start_server(model=name) as server:
            client = await open_client(server.ws_url)
            factors[name] = client.welcome.model.latent_rgb
            await client.close()
    assert factors["tiny"] != factors["tiny-sdxl"]


async def test_every_request_field(start_server, model_name) -> None:
    """One job per field (or group of fields), each must complete as asked."""
    async with start_server(model=model_name) as server:
        client = await open_client(server.ws_url)
        base = (await run(client, "base"))[-1]
        assert isinstance(base, Complete)

        await client.send({"type": "submit", "id": "long", "params": {"prompt": "a", "steps": 150}})
        await client.recv_until(lambda m: isinstance(m, Started) and m.id == "long")
        assert isinstance((await run(client, "next", replaces="long"))[-1], Complete)
        ends = [m for m in client.received if is_terminal(m, "long")]
        assert [(m.type, m.reason) for m in ends] == [("cancelled", "replaced")]

        negative = (await run(client, "neg", negative_prompt="blurry, dark"))[-1]
        assert negative.images[0].data != base.images[0].data

        sized = await run(client, "size", width=72, height=64)
        assert (sized[-1].images[0].width, sized[-1].images[0].height) == (72, 64)

        steps = await run(client, "steps", steps=3, guidance_scale=1.0)
        started = next(m for m in steps if isinstance(m, Started))
        assert started.steps == 3

        seeded = await run(client, "seed", seed=99, num_images=2)
        assert [i.seed for i in seeded[-1].images] == [99, 100]

        for scheduler in client.welcome.model.schedulers:
            messages = await run(client, f"s-{scheduler}", scheduler=scheduler, steps=3)
            started = next(m for m in messages if isinstance(m, Started))
            progress = [m for m in messages if isinstance(m, Progress)]
            assert isinstance(messages[-1], Complete), scheduler
            assert progress[-1].step == started.steps, scheduler

        init = png(noise(72, 64))
        img2img = await run(client, "img2img", init_image=init, strength=0.5, steps=4)
        started = next(m for m in img2img if isinstance(m, Started))
        assert started.steps == 2, "img2img runs strength x steps"
        assert (started.width, started.height) == (72, 64), "size defaults to the init image"
        assert isinstance(img2img[-1], Complete)

        mask = np.zeros((64, 72), dtype=np.uint8)
        mask[:, 36:] = 255
        inpaint = await run(
            client, "inpaint", init_image=init, mask=png(Image.fromarray(mask)), steps=2
        )
        out = pixels(inpaint[-1].images[0].data)
        kept = pixels(init)
        assert (out[:, :36] == kept[:, :36]).all(), "the black part of the mask is kept exactly"
        assert (out[:, 36:] != kept[:, 36:]).any()

        previews = await run(
            client,
            "preview",
            steps=3,
            preview={"kind": "image", "every": 1, "format": "webp", "max_side": 8},
            output={"format": "webp", "quality": 80},
        )
        assert [m.step for m in previews if isinstance(m, ImagePreview)] == [1, 2]
        assert previews[-1].images[0].format == "webp"
        await client.close()


async def test_img2img_with_an_explicit_size_scales_the_init_image(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        messages = await run(client, "j", init_image=png(noise(200, 100)), width=128, height=64)
        assert (messages[-1].images[0].width, messages[-1].images[0].height) == (128, 64)
        await client.close()


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"init_image": b"not an image"}, "params.init_image is not a PNG"),
        ({"init_image": png(noise(64, 64)), "mask": b"\x89PNG\r\n"}, "params.mask"),
        ({"init_image": png(noise(64, 64)), "mask": png(noise(72, 64))}, "same size"),
        ({"init_image": png(noise(40, 40))}, "too small"),
        ({"init_image": png(noise(2100, 1100))}, "too large"),
        ({"init_image": png(Image.new("L", (5000, 5000)))}, "5000x5000 pixels"),
    ],
    ids=["garbage", "bad-mask", "size-mismatch", "too-small", "too-large", "bomb"],
)
async def test_bad_images_are_refused(start_server, fields, needle) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.send({"type": "submit", "id": "j", "params": {"prompt": "x", **fields}})
        error = await client.recv()
        assert (error.type, error.code, error.id) == ("error", "bad_image", "j")
        assert needle in error.message
        await client.close()


async def test_a_strength_too_small_for_the_steps_still_runs_one_step(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        messages = await run(client, "j", steps=1, init_image=png(noise(64, 64)), strength=0.3)
        started = next(m for m in messages if isinstance(m, Started))
        assert started.steps == 1
        assert isinstance(messages[-1], Complete)
        await client.close()


async def test_lcm_refuses_more_steps_than_it_was_distilled_for(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.send(
            {
                "type": "submit",
                "id": "j",
                "params": {"prompt": "x", "scheduler": "lcm", "steps": 51},
            }
        )
        error = await client.recv()
        assert (error.code, error.field, error.id) == ("invalid_request", "params.steps", "j")
        assert "lcm" in error.message
        messages = await run(client, "k", scheduler="lcm", steps=50, guidance_scale=1.0)
        assert isinstance(messages[-1], Complete)
        await client.close()


async def test_a_long_prompt_runs_and_says_what_was_cut(start_server, model_name) -> None:
    async with start_server(model=model_name) as server:
        client = await open_client(server.ws_url)
        messages = await run(client, "long", prompt="a photo of a cat " * 40)
        started = next(m for m in messages if isinstance(m, Started))
        assert started.warnings and "prompt is" in started.warnings[0]
        assert isinstance(messages[-1], Complete)
        short = await run(client, "short")
        assert next(m for m in short if isinstance(m, Started)).warnings is None
        await client.close()


async def test_an_inpainting_model_does_only_inpaint(start_server) -> None:
    async with start_server(model="tiny-inpaint") as server:
        client = await open_client(server.ws_url)
        assert client.welcome.model.modes == ["inpaint"]
        await client.submit("t", steps=1)
        error = await client.recv()
        assert (error.code, error.id) == ("unsupported", "t")
        init = png(noise(64, 64))
        mask = np.zeros((64, 64), dtype=np.uint8)
        mask[32:] = 255
        messages = await run(client, "i", init_image=init, mask=png(Image.fromarray(mask)))
        assert isinstance(messages[-1], Complete)
        assert (pixels(messages[-1].images[0].data)[:32] == pixels(init)[:32]).all()
        await client.close()


@pytest.mark.parametrize("batching", ["one at a time", "batched"])
async def test_jobs_of_every_kind_interleave_without_leaking_state(
    start_server, model_name, batching
) -> None:
    """The same job gives the same bytes alone and between jobs of other kinds, run one
    at a time; run together (sharing UNet calls), the same image up to rounding."""
    init = png(noise(64, 64, seed=3))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    kinds = {
        "plain": {},
        "img2img": {"init_image": init, "strength": 0.6, "steps": 3},
        "inpaint": {"init_image": init, "mask": png(Image.fromarray(mask)), "steps": 3},
        "dpmpp": {"scheduler": "dpmpp_2m_karras", "steps": 3},
        "ancestral": {"scheduler": "euler_a", "steps": 3},
        "lcm": {"scheduler": "lcm", "steps": 2, "guidance_scale": 1.0},
    }
    options = ONE_AT_A_TIME if batching == "one at a time" else {}
    async with start_server(model=model_name, **options) as server:
        client = await open_client(server.ws_url)
        alone = {}
        for name, fields in kinds.items():
            alone[name] = (await run(client, f"{name}-alone", **fields))[-1].images[0].data
        # Now all at once, queued back to back in a different order.
        order = list(reversed(kinds))
        for name in order:
            message = {
                "type": "submit",
                "id": f"{name}-mixed",
                "params": {"prompt": "a cat", "steps": 2, "seed": 1, **kinds[name]},
            }
            await client.send(message)
        got = await client.recv_until(lambda m: is_terminal(m, f"{order[-1]}-mixed"))
        mixed = {
            m.id.removesuffix("-mixed"): m.images[0].data for m in got if isinstance(m, Complete)
        }
        assert mixed.keys() == alone.keys()
        if batching == "one at a time":
            assert mixed == alone
        else:
            rows = metric_samples(server, "latentcast_unet_rows")
            assert rows["sum"] > rows["count"] * 2, "some UNet calls held several jobs"
            differences = {name: largest_difference(mixed[name], alone[name]) for name in alone}
            assert max(differences.values()) <= BATCH_ROUNDING, differences
        await client.close()


async def test_a_job_scheduler_does_not_shape_later_jobs_schedulers(
    start_server, model_name
) -> None:
    """Each job's scheduler comes from the model's load-time config (issue 9, item 5).

    With schedulers built from the previous job's, an lcm job left clip_sample=False on
    every later config, a ddim job set_alpha_to_one=False on lcm's, dpmpp_2m_karras
    use_karras_sigmas=True on euler_a's and ddim's.
    """
    async with start_server(model=model_name) as server:
        model = server.model
        assert model is not None

        def configs() -> dict[str, dict]:
            return {name: dict(model.make_scheduler(name).config) for name in model.schedulers}

        before = await server.engine_thread.call(configs)
        client = await open_client(server.ws_url)
        first = (await run(client, "first"))[-1].images[0].data
        for scheduler in ("dpmpp_2m_karras", "ddim", "lcm"):
            guidance = 1.0 if scheduler == "lcm" else 7.5
            messages = await run(client, scheduler, scheduler=scheduler, guidance_scale=guidance)
            assert isinstance(messages[-1], Complete)
        assert await server.engine_thread.call(configs) == before
        assert (await run(client, "again"))[-1].images[0].data == first
        await client.close()


async def test_cached_prompts_give_the_same_bytes_in_every_mode(start_server, model_name) -> None:
    """txt2img, img2img and inpaint share the prompt cache: a hit gives a miss's bytes."""
    init = png(noise(64, 64, seed=5))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[:, 32:] = 255
    kinds = {
        "txt2img": {},
        "img2img": {"init_image": init, "strength": 0.6, "steps": 3},
        "inpaint": {"init_image": init, "mask": png(Image.fromarray(mask)), "steps": 3},
    }
    results = []
    for order in (list(kinds), list(reversed(kinds))):
        async with start_server(model=model_name) as server:
            client = await open_client(server.ws_url)
            # The first kind encodes the prompt, the others find it cached.
            results.append(
                {
                    name: (await run(client, name, negative_prompt="dark", **kinds[name]))[-1]
                    .images[0]
                    .data
                    for name in order
                }
            )
            await client.close()
    assert results[0] == results[1]
