"""ControlNet per job (feature "controls") over real sockets, for tiny (SD 1.x) and tiny-sdxl.

A tiny ControlNet built from each tiny UNet (tests/fixtures/controlnets.py) is loaded by
the server through ``--controlnet NAME=FOLDER``, as a real one would be. What a client
must see:

* ``welcome`` lists the ControlNets, ``limits.max_controls`` 3 and the feature;
* a control changes the image; scale 0 gives the image without control (bit for bit,
  alone); a start/end window gives yet another image; alone, a job with a control is the
  bytes of diffusers' ControlNet pipeline of its mode (txt2img, img2img, inpaint; SD 1.x,
  SDXL and a 9-channel inpainting UNet);
* a job without controls that shares the engine with controlled jobs gets its lone
  image up to rounding, and so do controlled jobs that share their ControlNet calls;
* img2img and inpaint run with a control;
* every bad input gets its code and field.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from latentcast.protocol import Complete
from latentcast.server.images import prepare_controls
from tests.fixtures.controlnets import build_tiny_controlnets
from tests.integration.test_batching import (
    as_sent,
    request_for,
    run_alone,
    submit_message,
    unet_rows,
    until_ended,
)
from tests.integration.test_breadth import noise, png
from tests.support import (
    BATCH_ROUNDING,
    Client,
    engine_hold,
    is_terminal,
    largest_difference,
    open_client,
)

MODELS = ["tiny", "tiny-sdxl"]
ONE_THREAD = {"cpu_threads": 1}
#: Far beyond rounding: what a control (or a different window) must change.
VISIBLE = 10 * BATCH_ROUNDING


def scribble(size: int = 64) -> Image.Image:
    """Dark strokes on white, as a user draws them: a square outline and a diagonal."""
    pixels = np.full((size, size, 3), 255, dtype=np.uint8)
    quarter = size // 4
    pixels[quarter : 3 * quarter, quarter : quarter + 3] = 0
    pixels[quarter : 3 * quarter, 3 * quarter - 3 : 3 * quarter] = 0
    pixels[quarter : quarter + 3, quarter : 3 * quarter] = 0
    pixels[3 * quarter - 3 : 3 * quarter, quarter : 3 * quarter] = 0
    for k in range(size):
        pixels[k, max(0, k - 1) : k + 1] = 0
    return Image.fromarray(pixels, "RGB")


def control(**fields: Any) -> dict[str, Any]:
    """A params.controls entry: the scribble, inverted (light strokes on black)."""
    return {"name": "scribble", "image": png(scribble()), "preprocess": "invert", **fields}


@pytest.fixture(scope="module")
def controlnet_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny ControlNet for each family (built once for the module)."""
    return build_tiny_controlnets(tmp_path_factory.mktemp("controlnets"))


def options(model_name: str, folders: dict[str, Path], **more: Any) -> dict[str, Any]:
    return {
        "model": model_name,
        "controlnets": (f"scribble={folders[model_name]}",),
        **ONE_THREAD,
        **more,
    }


async def image_of(client: Client, job_id: str, fields: dict[str, Any]) -> bytes:
    complete = await run_alone(client, job_id, fields)
    return complete.images[0].data


# ---------------------------------------------------------------------- welcome


@pytest.mark.parametrize("model_name", MODELS)
async def test_welcome_lists_the_controlnets_max_controls_and_the_feature(
    start_server, controlnet_folders, model_name
) -> None:
    async with start_server(**options(model_name, controlnet_folders)) as server:
        client = await open_client(server.ws_url)
        welcome = client.welcome
        assert welcome.model.controlnets == ["scribble"]
        assert welcome.models[0].controlnets == ["scribble"]
        assert welcome.limits.max_controls == 3
        assert "controls" in welcome.features
        await client.close()


async def test_without_controlnets_there_is_no_feature_and_a_control_is_refused(
    start_server,
) -> None:
    async with start_server(**ONE_THREAD) as server:
        client = await open_client(server.ws_url)
        assert client.welcome.model.controlnets == []
        assert client.welcome.limits.max_controls == 0
        assert "controls" not in client.welcome.features
        await client.send(submit_message("j", {"controls": [control()]}))
        error = await client.recv()
        assert (error.type, error.code, error.id) == ("error", "invalid_request", "j")
        assert error.field == "params.controls"
        await client.close()


# ---------------------------------------------------------------------- effect


@pytest.mark.both_engines
async def test_controls_work_on_every_engine_kind(start_server, controlnet_folders) -> None:
    """The embedded engine and engines in Ray actors (which load the ControlNet from the
    same --controlnet option in their own process) steer alike."""
    async with start_server(**options("tiny", controlnet_folders)) as server:
        client = await open_client(server.ws_url)
        assert "controls" in client.welcome.features
        base = {"seed": 3, "steps": 3}
        plain = await image_of(client, "plain", base)
        steered = await image_of(client, "steered", {**base, "controls": [control()]})
        zero = await image_of(client, "zero", {**base, "controls": [control(scale=0.0)]})
        await client.close()
    assert largest_difference(steered, plain) > VISIBLE
    assert zero == plain


@pytest.mark.parametrize("model_name", MODELS)
async def test_a_control_steers_the_image_scale_zero_does_not_and_the_window_matters(
    start_server, controlnet_folders, model_name
) -> None:
    async with start_server(**options(model_name, controlnet_folders)) as server:
        client = await open_client(server.ws_url)
        base = {"seed": 7, "steps": 4}
        plain = await image_of(client, "plain", base)
        steered = await image_of(client, "steered", {**base, "controls": [control()]})
        zero = await image_of(client, "zero", {**base, "controls": [control(scale=0.0)]})
        late = await image_of(client, "late", {**base, "controls": [control(start=0.5)]})
        early = await image_of(client, "early", {**base, "controls": [control(end=0.5)]})
        stronger = await image_of(client, "strong", {**base, "controls": [control(scale=2.0)]})
        canny = await image_of(client, "canny", {**base, "controls": [control(preprocess="canny")]})
        blank = {"image": png(Image.new("RGB", (64, 64))), "preprocess": "none"}
        black = await image_of(client, "black", {**base, "controls": [control(**blank)]})
        await client.close()
    assert largest_difference(steered, plain) > VISIBLE
    # Scale 0: the ControlNet adds nothing, the bytes of the job without control.
    assert zero == plain
    # The window: acting for half of the steps is neither full control nor none. The
    # early steps shape the image most: the first half is close to full control, the
    # second half close to none, each still far from rounding away from the other.
    for window in (early, late):
        assert largest_difference(window, steered) > BATCH_ROUNDING
        assert largest_difference(window, plain) > BATCH_ROUNDING
    assert largest_difference(early, plain) > VISIBLE
    assert largest_difference(late, steered) > VISIBLE
    assert largest_difference(stronger, steered) > VISIBLE
    # The image matters, not only the ControlNet: a blank control image, or another
    # preprocessing of the same image, steers elsewhere.
    assert largest_difference(black, steered) > VISIBLE
    assert largest_difference(canny, steered) > VISIBLE


#: The diffusers ControlNet pipeline of each mode (SD 1.x / SD 2.x; SDXL adds "XL").
CONTROLNET_PIPELINES = {
    "txt2img": "StableDiffusion{xl}ControlNetPipeline",
    "img2img": "StableDiffusion{xl}ControlNetImg2ImgPipeline",
    "inpaint": "StableDiffusion{xl}ControlNetInpaintPipeline",
}


@pytest.mark.parametrize("model_name", [*MODELS, "tiny-inpaint"])
async def test_alone_a_job_with_controls_is_the_controlnet_pipeline(
    start_server, controlnet_folders, model_name
) -> None:
    """Every mode the model has, with a control (scale and window), alone: the bytes of
    diffusers' ControlNet pipeline of that mode with the same seed, scheduler and control
    image (inpaint: then composited, as the server does)."""
    folders = {**controlnet_folders, "tiny-inpaint": controlnet_folders["tiny"]}
    init = png(noise(64, 64, seed=2))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    by_mode = {
        "txt2img": {"num_images": 2},
        "img2img": {"init_image": init, "strength": 0.75},
        "inpaint": {"init_image": init, "mask": png(Image.fromarray(mask)), "strength": 0.75},
    }
    async with start_server(**options(model_name, folders, max_batch=1)) as server:
        client = await open_client(server.ws_url)
        welcome = client.welcome
        for mode in welcome.model.modes:
            fields = {
                "seed": 11,
                "steps": 4,
                "controls": [control(scale=0.7, start=0.25, end=0.75)],
                **by_mode[mode],
            }
            ours = (await run_alone(client, mode, fields)).images
            request = request_for(fields, welcome)
            (job_control,) = prepare_controls(
                _params(fields), welcome.limits, request.width, request.height
            )
            direct = await server.engine_thread.call(
                _controlnet_pipeline_pngs, server.model, request, job_control
            )
            assert [image.data for image in ours] == direct, mode
        await client.close()


def _params(fields: dict[str, Any]) -> Any:
    from latentcast.protocol import GenerationParams

    return GenerationParams(prompt="a cat", **fields)


def _controlnet_pipeline_pngs(model: Any, request: Any, job_control: Any) -> list[bytes]:
    import diffusers

    from latentcast.server.engine import diffusers_arguments

    xl = "XL" if model.family.name == "sdxl" else ""
    cls = getattr(diffusers, CONTROLNET_PIPELINES[request.mode].format(xl=xl))
    pipeline = cls.from_pipe(
        model.pipeline_for(request.mode),
        controlnet=model.controlnet(job_control.name),
        dtype=model.dtype,
    )
    pipeline.set_progress_bar_config(disable=True)
    pipeline.scheduler = model.make_scheduler(request.scheduler)
    image_argument = "image" if request.mode == "txt2img" else "control_image"
    images = pipeline(
        **diffusers_arguments(request),
        **{image_argument: job_control.image},
        controlnet_conditioning_scale=job_control.scale,
        control_guidance_start=job_control.start,
        control_guidance_end=job_control.end,
    ).images
    return as_sent(images, request)


# ---------------------------------------------------------------------- batching


@pytest.mark.parametrize("model_name", MODELS)
async def test_jobs_with_and_without_controls_share_the_engine_unaffected(
    start_server, controlnet_folders, model_name
) -> None:
    """A job without controls, two jobs sharing their ControlNet calls with different
    scales and windows, and a job with the control twice: together, each gives its lone
    image up to rounding."""
    kinds = {
        "none": {"seed": 1, "steps": 3},
        "full": {"seed": 2, "steps": 3, "controls": [control()]},
        "weak-late": {"seed": 3, "steps": 3, "controls": [control(scale=0.5, start=0.4)]},
        "twice": {
            "seed": 4,
            "steps": 3,
            "controls": [control(scale=0.6), control(preprocess="none", end=0.5)],
        },
    }
    async with start_server(**options(model_name, controlnet_folders, max_batch=16)) as server:
        loner = await open_client(server.ws_url)
        alone = {name: await image_of(loner, name, fields) for name, fields in kinds.items()}
        await loner.close()
        # The two single-control jobs share one group: their UNet calls hold 4 rows.
        sessions = [await open_client(server.ws_url) for _ in kinds]
        calls, rows = unet_rows(server)
        async with engine_hold(server):
            for session, (name, fields) in zip(sessions, kinds.items(), strict=True):
                await session.send(submit_message(name, fields))
            for session, name in zip(sessions, kinds, strict=True):
                await session.recv_until(lambda m, n=name: m.type == "accepted" and m.id == n)
        await asyncio.gather(
            *(until_ended(session, [name]) for session, name in zip(sessions, kinds, strict=True))
        )
        calls_now, rows_now = unet_rows(server)
        # Three groups (none, scribble, scribble+scribble) of 3 steps: 9 calls.
        assert calls_now - calls == 9
        assert rows_now - rows == 3 * (2 + 4 + 2)
        for session, name in zip(sessions, kinds, strict=True):
            (end,) = [m for m in session.received if is_terminal(m, name)]
            assert isinstance(end, Complete), end
            difference = largest_difference(end.images[0].data, alone[name])
            assert difference <= BATCH_ROUNDING, (name, difference)
            await session.close()
    assert largest_difference(alone["full"], alone["none"]) > VISIBLE


# ---------------------------------------------------------------------- modes


@pytest.mark.parametrize("model_name", MODELS)
async def test_img2img_and_inpaint_run_with_a_control(
    start_server, controlnet_folders, model_name
) -> None:
    init = png(noise(64, 64, seed=5))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    modes = {
        "img2img": {"init_image": init, "strength": 0.7},
        "inpaint": {"init_image": init, "mask": png(Image.fromarray(mask)), "strength": 1.0},
    }
    async with start_server(**options(model_name, controlnet_folders)) as server:
        client = await open_client(server.ws_url)
        for mode, fields in modes.items():
            base = {"seed": 9, "steps": 4, **fields}
            plain = await image_of(client, f"{mode}-plain", base)
            steered = await image_of(client, f"{mode}-ctl", {**base, "controls": [control()]})
            assert largest_difference(plain, steered) > VISIBLE, mode
        await client.close()


async def test_a_9_channel_inpainting_unet_takes_a_control_of_its_family(
    start_server, controlnet_folders
) -> None:
    """tiny-inpaint's UNet is the tiny SD 1.x one with 9 input channels: the SD 1.x
    ControlNet fits it and gets the 4-channel latents."""
    init = png(noise(64, 64, seed=5))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[8:56, 8:56] = 255
    base = {"seed": 9, "steps": 3, "init_image": init, "mask": png(Image.fromarray(mask))}
    async with start_server(
        model="tiny-inpaint", controlnets=(f"scribble={controlnet_folders['tiny']}",), **ONE_THREAD
    ) as server:
        client = await open_client(server.ws_url)
        plain = await image_of(client, "plain", base)
        steered = await image_of(client, "ctl", {**base, "controls": [control()]})
        await client.close()
    assert largest_difference(plain, steered) > VISIBLE


# ---------------------------------------------------------------------- bad input

BAD = {
    "unknown-name": (
        {"controls": [control(name="depth")]},
        "invalid_request",
        "params.controls.0.name",
    ),
    "bad-image": ({"controls": [control(image=b"not a png")]}, "bad_image", None),
    "huge-image": (
        {"controls": [control(image=png(Image.new("L", (5000, 5000))))]},
        "bad_image",
        None,
    ),
    "start-not-before-end": (
        {"controls": [control(start=0.5, end=0.5)]},
        "invalid_request",
        "params.controls.0.end",
    ),
    "scale-too-large": (
        {"controls": [control(scale=2.5)]},
        "invalid_request",
        "params.controls.0.scale",
    ),
    "bad-preprocess": (
        {"controls": [control(preprocess="depth")]},
        "invalid_request",
        "params.controls.0.preprocess",
    ),
    "too-many": ({"controls": [control()] * 4}, "invalid_request", "params.controls"),
    "too-many-even-if-bad": (
        {"controls": [control(name="depth")] * 4},
        "invalid_request",
        "params.controls",
    ),
}


async def test_every_bad_control_gets_its_code_and_field(start_server, controlnet_folders) -> None:
    async with start_server(**options("tiny", controlnet_folders)) as server:
        client = await open_client(server.ws_url)
        for case, (fields, code, field) in BAD.items():
            await client.send(submit_message(case, fields))
            error = await client.recv()
            assert (error.type, error.code, error.id) == ("error", code, case), (case, error)
            assert error.field == field, (case, error)
            if code == "bad_image":
                assert "params.controls.0.image" in error.message, (case, error)
        # The bad one is the second: its index is named.
        await client.send(
            submit_message("second", {"controls": [control(), control(image=b"junk")]})
        )
        error = await client.recv()
        assert error.code == "bad_image" and "params.controls.1.image" in error.message
        # And the session goes on: a good control completes.
        complete = await run_alone(client, "good", {"controls": [control()] * 3})
        assert len(complete.images) == 1
        await client.close()


# ---------------------------------------------------------------------- browser page


async def test_a_scribble_drawn_in_the_browser_page_steers_the_image(
    start_server, controlnet_folders
) -> None:
    """In headless Chromium: strokes drawn on the sketch canvas, used "as a scribble
    control", go out as params.controls (scribble, inverted, the scale slider) and steer
    the result: another image than without the sketch, and the image a Python client gets
    with the same control image."""
    from tests.integration.test_browser import (
        CHROMIUM,
        Frames,
        chromium,
        open_page,
        set_fields,
        wait_for,
    )

    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}: `make browser-deps` installs it")
    frames = Frames()
    async with (
        start_server(**options("tiny", controlnet_folders)) as server,
        chromium() as browser,
        open_page(browser, server.http_url + "/", frames) as page,
    ):
        await page.wait_for_selector("body[data-conn=open]")
        assert frames.received[0]["model"]["controlnets"] == ["scribble"]
        await set_fields(page, prompt="a house", steps="3", width="64", height="64", seed="5")
        await page.click("#generate")
        plain = await wait_for(page, "s.state === 'complete'")

        # Draw: a few strokes across the canvas (dark brush on the light canvas).
        box = await page.eval_on_selector(
            "#sketch", "c => { const r = c.getBoundingClientRect(); return [r.x, r.y, r.width]; }"
        )
        x0, y0, side = box
        for start, end in (((0.2, 0.2), (0.8, 0.2)), ((0.5, 0.1), (0.5, 0.9))):
            await page.mouse.move(x0 + start[0] * side, y0 + start[1] * side)
            await page.mouse.down()
            for k in range(1, 11):
                t = k / 10
                await page.mouse.move(
                    x0 + (start[0] + t * (end[0] - start[0])) * side,
                    y0 + (start[1] + t * (end[1] - start[1])) * side,
                )
            await page.mouse.up()
        await page.check("#use-sketch")
        await page.select_option("#sketch-as", "control")
        await page.click("#generate")
        steered = await wait_for(page, "s.state === 'complete' && s.job !== a", plain["job"])

        submit = frames.submits()[-1]
        assert submit["id"] == steered["job"]
        (sent,) = submit["params"]["controls"]
        assert (sent["name"], sent["scale"], sent["preprocess"]) == ("scribble", 1, "invert")
        assert "init_image" not in submit["params"]
        sketch = np.asarray(Image.open(io.BytesIO(sent["image"])).convert("L"))
        assert sketch.shape == (64, 64) and sketch.min() < 128 < sketch.max()

        (plain_complete,) = frames.received_for(plain["job"], "complete")
        (steered_complete,) = frames.received_for(steered["job"], "complete")
        page_image = steered_complete["images"][0]["data"]
        assert largest_difference(page_image, plain_complete["images"][0]["data"]) > VISIBLE

        # The same control from a Python client: the same bytes.
        client = await open_client(server.ws_url)
        fields = {
            "prompt": "a house",
            "seed": 5,
            "steps": 3,
            "width": 64,
            "height": 64,
            "guidance_scale": submit["params"]["guidance_scale"],
            "scheduler": submit["params"]["scheduler"],
            "controls": [sent],
        }
        assert await image_of(client, "same", fields) == page_image
        await client.close()
