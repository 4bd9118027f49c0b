"""Several models on one server (feature "models": params.model, --model NAME=SPEC,
--max-resident-models; PROTOCOL.md sections 2, 3, 4 and 9).

Real servers with the built-in tiny models (``tiny`` is SD 1.x, ``tiny-sdxl`` SDXL,
``tiny-inpaint`` an inpainting-only SD 1.x), real clients.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from latentcast.protocol import Complete, Error, Progress, Queued, Started
from tests.fixtures.loras import build_tiny_lora
from tests.support import Client, engine_hold, is_terminal, open_client

#: Two models, the SD 1.x one the default.
TWO_MODELS = ("sd=tiny", "xl=tiny-sdxl")
#: Alone, with a fixed seed: the bytes of a job do not depend on what else runs.
JOB: dict[str, Any] = {"steps": 2, "seed": 7, "guidance_scale": 1.0}


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA for the tiny SD 1.x model."""
    return build_tiny_lora(tmp_path_factory.mktemp("loras") / "sd1")


def model_metric(server: Any, name: str, model: str) -> float:
    """The value of ``name{model="..."}`` in ``server``'s /metrics (0 when absent)."""
    pattern = re.compile(rf'^{re.escape(name)}\{{model="{re.escape(model)}"\}} (\S+)$')
    for line in server.metrics.render().decode().splitlines():
        match = pattern.match(line)
        if match:
            return float(match.group(1))
    return 0.0


async def run(client: Client, job_id: str, **params: Any) -> list[Any]:
    """Submit and read every message of the job up to its terminal one."""
    await client.submit(job_id, **params)
    return await client.job_messages(job_id)


async def rejection(client: Client, job_id: str, **params: Any) -> Error:
    """Submit a job the server must refuse; its error."""
    await client.submit(job_id, **params)
    answer = (await client.recv_until(lambda m: getattr(m, "id", None) == job_id))[-1]
    assert isinstance(answer, Error), answer
    return answer


@asynccontextmanager
async def loader_hold(server: Any) -> AsyncIterator[None]:
    """Block the server's model loader thread for the block: a load waits behind it."""
    release = threading.Event()
    held = asyncio.ensure_future(server.models.loader_thread.call(release.wait, 120))
    await asyncio.sleep(0)
    try:
        yield
    finally:
        release.set()
        await held


async def test_welcome_lists_every_model_the_default_first(start_server) -> None:
    async with start_server(model=TWO_MODELS) as server:
        client = await open_client(server.ws_url)
        welcome = client.welcome
        assert "models" in welcome.features
        assert [model.name for model in welcome.models] == ["sd", "xl"]
        assert welcome.model == welcome.models[0]
        sd, xl = welcome.models
        assert (sd.family, xl.family) == ("sd1", "sdxl")
        for model in (sd, xl):
            assert model.modes == ["txt2img", "img2img", "inpaint"]
            assert model.schedulers and model.latent_channels == 4
            assert model.vae_scale_factor == 8 and model.latent_rgb is not None
        await client.close()


async def test_one_model_announces_no_models_feature(start_server) -> None:
    async with start_server(model="tiny") as server:
        client = await open_client(server.ws_url)
        assert "models" not in client.welcome.features
        assert [model.name for model in client.welcome.models] == ["tiny"]
        await client.close()


async def test_a_job_on_each_model_is_that_of_a_server_serving_only_that_model(
    start_server,
) -> None:
    images: dict[str, bytes] = {}
    async with start_server(model=TWO_MODELS) as server:
        client = await open_client(server.ws_url)
        for name in ("sd", "xl"):
            end = (await run(client, name, model=name, **JOB))[-1]
            assert isinstance(end, Complete), end
            images[name] = end.images[0].data
        # Without params.model: the default model's job.
        default = (await run(client, "default", **JOB))[-1]
        assert isinstance(default, Complete), default
        assert default.images[0].data == images["sd"]
        await client.close()
    assert images["sd"] != images["xl"]
    for name, spec in (("sd", "tiny"), ("xl", "tiny-sdxl")):
        async with start_server(model=spec) as alone:
            client = await open_client(alone.ws_url)
            end = (await run(client, "alone", **JOB))[-1]
            assert isinstance(end, Complete), end
            assert end.images[0].data == images[name], f"model {name} differs from {spec} alone"
            await client.close()


async def test_an_unknown_model_is_an_invalid_request(start_server) -> None:
    async with start_server(model=TWO_MODELS) as server:
        client = await open_client(server.ws_url)
        error = await rejection(client, "j", model="nope")
        assert (error.code, error.field) == ("invalid_request", "params.model")
        assert "nope" in error.message
        await client.close()


async def test_rules_are_the_chosen_models(start_server, lora_file: Path) -> None:
    """A LoRA of the default model named on the other, a mode the chosen model cannot do,
    a scheduler's step limit: each checked against the model the submit names."""
    models = ("sd=tiny", "inpainter=tiny-inpaint")
    async with start_server(model=models, loras=(f"ink={lora_file}",)) as server:
        client = await open_client(server.ws_url)
        sd, inpainter = client.welcome.models
        assert sd.loras == ["ink"] and inpainter.loras == []
        lora = {"loras": [{"name": "ink", "scale": 1.0}]}
        error = await rejection(client, "lora", model="inpainter", **lora)
        assert (error.code, error.field) == ("invalid_request", "params.loras.0.name")
        ok = (await run(client, "lora-ok", model="sd", **lora))[-1]
        assert isinstance(ok, Complete), ok
        error = await rejection(client, "mode", model="inpainter")
        assert error.code == "unsupported", error
        assert "inpainter" in error.message
        limits = {"scheduler": "lcm", "steps": 51}
        for name in ("sd", "inpainter"):
            error = await rejection(client, f"lcm-{name}", model=name, **limits)
            assert (error.code, error.field) == ("invalid_request", "params.steps")
        await client.close()


async def test_with_one_resident_model_alternating_jobs_all_complete(start_server) -> None:
    async with start_server(model=TWO_MODELS, max_resident_models=1) as server:
        assert server.models.resident == ("sd",)
        assert model_metric(server, "latentcast_model_resident", "xl") == 0
        assert model_metric(server, "latentcast_model_unloads_total", "xl") == 1, "at start"
        client = await open_client(server.ws_url)
        order = ["sd1", "xl1", "sd2", "xl2"]
        for job_id in order:
            await client.submit(job_id, model=job_id[:2], **JOB)
        for job_id in order:
            end = await client.ended(job_id)
            assert isinstance(end, Complete), end
        loading = [m for m in client.received if isinstance(m, Queued) and m.loading]
        assert "xl1" in {m.id for m in loading}, "the job waiting for xl heard it loads"
        xl1 = [m for m in client.received if getattr(m, "id", None) == "xl1"]
        kinds = [(m.type, getattr(m, "loading", None)) for m in xl1]
        assert kinds.index(("queued", True)) < kinds.index(("started", None))
        assert ("queued", False) in kinds, "and heard when the load was done"
        assert model_metric(server, "latentcast_model_loads_total", "xl") >= 2
        assert model_metric(server, "latentcast_model_unloads_total", "sd") >= 1
        assert model_metric(server, "latentcast_model_load_seconds", "xl") > 0
        resident = [model_metric(server, "latentcast_model_resident", m) for m in ("sd", "xl")]
        assert sorted(resident) == [0, 1]
        unloads = [event for event in server.models.history if event.kind == "unload"]
        assert unloads and all(event.memory_before is not None for event in unloads)
        assert all(event.memory_after is not None for event in unloads)
        await client.close()


async def test_a_model_with_a_running_job_is_not_unloaded_and_takes_no_new_jobs(
    start_server,
) -> None:
    """One resident model, busy: the other model's job waits for the running job to end
    (the busy model is never unloaded), and a later job for the busy model does not get
    in ahead of it (the busy model retires until it is unloaded)."""
    async with start_server(model=TWO_MODELS, max_resident_models=1) as server:
        client = await open_client(server.ws_url)
        await client.submit("sd1", model="sd", steps=30, width=128, height=128)
        await client.recv_until(lambda m: isinstance(m, Started) and m.id == "sd1")
        await client.submit("xl1", model="xl", **JOB)
        await client.recv_until(
            lambda m: isinstance(m, Queued) and m.id == "xl1" and m.loading is True
        )
        assert server.models.resident == ("sd",), "busy: still loaded"
        await client.submit("sd2", model="sd", **JOB)
        for job_id in ("sd1", "xl1", "sd2"):
            assert isinstance(await client.ended(job_id), Complete)
        # sd1's last step (its last progress, never replaced) came before xl1 started.
        order = [
            (m.type, m.id, getattr(m, "step", None))
            for m in client.received
            if isinstance(m, Started | Progress) and m.id in ("sd1", "xl1", "sd2")
        ]
        assert order.index(("progress", "sd1", 30)) < order.index(("started", "xl1", None))
        assert order.index(("started", "xl1", None)) < order.index(("started", "sd2", None))
        await client.close()


async def test_jobs_of_a_loaded_model_run_while_another_model_loads(start_server) -> None:
    """Shown by order: the loader thread is held, so xl stays loading until released;
    a job for sd submitted after the xl job starts and completes meanwhile."""
    models = ("sd=tiny", "inpainter=tiny-inpaint", "xl=tiny-sdxl")
    async with start_server(model=models, max_resident_models=2) as server:
        assert server.models.resident == ("sd", "inpainter")
        client = await open_client(server.ws_url)
        await client.submit("sd1", model="sd", steps=40, width=128, height=128)
        await client.recv_until(lambda m: isinstance(m, Started) and m.id == "sd1")
        async with loader_hold(server):
            await client.submit("xl1", model="xl", **JOB)
            await client.recv_until(
                lambda m: isinstance(m, Queued) and m.id == "xl1" and m.loading is True
            )
            await client.submit("sd2", model="sd", **JOB)
            sd2 = await client.ended("sd2")
            assert isinstance(sd2, Complete), sd2
            xl1_so_far = [m for m in client.received if getattr(m, "id", None) == "xl1"]
            assert not any(isinstance(m, Started) for m in xl1_so_far)
            # The idle model made room; the busy one was kept.
            assert "inpainter" not in server.models.resident
            assert "sd" in server.models.resident
        xl1 = await client.ended("xl1")
        assert isinstance(xl1, Complete), xl1
        sd1 = await client.ended("sd1")
        assert isinstance(sd1, Complete), sd1
        assert server.models.resident == ("sd", "xl")
        await client.close()


async def test_a_model_that_fails_to_load_fails_its_jobs_and_the_server_goes_on(
    start_server, model_cache: Path, tmp_path: Path
) -> None:
    from latentcast.server.models import tiny_model_dir

    folder = tmp_path / "copy"
    shutil.copytree(tiny_model_dir(model_cache, "tiny"), folder)
    async with start_server(model=("sd=tiny", f"copy={folder}"), max_resident_models=1) as server:
        assert server.models.resident == ("sd",)
        (folder / "unet").rename(tmp_path / "unet-away")
        client = await open_client(server.ws_url)
        await client.submit("copy1", model="copy", **JOB)
        await client.submit("sd1", model="sd", **JOB)
        failed = await client.ended("copy1")
        assert isinstance(failed, Error) and failed.code == "generation_failed", failed
        assert "'copy' could not be loaded" in failed.message
        done = await client.ended("sd1")
        assert isinstance(done, Complete), done
        assert model_metric(server, "latentcast_model_load_failures_total", "copy") == 1
        # A later job tries the load again.
        (tmp_path / "unet-away").rename(folder / "unet")
        again = (await run(client, "copy2", model="copy", **JOB))[-1]
        assert isinstance(again, Complete), again
        assert again.images[0].data == done.images[0].data, "the same weights as tiny"
        await client.close()


async def test_batches_never_mix_models(start_server) -> None:
    """Two unguided jobs per model of one size: UNet calls of two rows (one model's two
    jobs), never three or four (the models' jobs together)."""
    async with start_server(model=TWO_MODELS, max_batch=8) as server:
        client = await open_client(server.ws_url)
        async with engine_hold(server):
            for job_id in ("sd1", "xl1", "sd2", "xl2"):
                await client.submit(job_id, model=job_id[:2], **{**JOB, "steps": 4})
            await client.recv_until(lambda m: m.type == "accepted" and m.id == "xl2")
        for job_id in ("sd1", "xl1", "sd2", "xl2"):
            assert isinstance(await client.ended(job_id), Complete)
        buckets = {}
        for line in server.metrics.render().decode().splitlines():
            match = re.match(r'^latentcast_unet_rows_bucket\{le="([^"]+)"\} (\S+)$', line)
            if match:
                buckets[match.group(1)] = float(match.group(2))
        assert buckets["2.0"] == buckets["+Inf"], f"a UNet call of more than 2 rows: {buckets}"
        assert buckets["1.0"] < buckets["+Inf"], f"no model's jobs shared a call: {buckets}"
        assert not [m for m in client.received if is_terminal(m) and m.type == "error"]
        await client.close()


async def test_a_job_waiting_for_its_model_at_the_drain_deadline_ends_with_shutdown(
    start_server,
) -> None:
    async with start_server(model=TWO_MODELS, max_resident_models=1, drain_timeout=0.5) as server:
        client = await open_client(server.ws_url)
        async with loader_hold(server):
            await client.submit("xl1", model="xl", **JOB)
            await client.recv_until(
                lambda m: isinstance(m, Queued) and m.id == "xl1" and m.loading is True
            )
            await server.drain()
            end = await client.ended("xl1")
            assert isinstance(end, Error) and end.code == "shutdown", end
        about = [m for m in client.received if getattr(m, "id", None) == "xl1"]
        assert [m for m in about if is_terminal(m)] == [end], "one terminal message"


async def test_each_model_is_offered_the_controlnets_of_its_family(
    start_server, tmp_path: Path
) -> None:
    """--controlnet with several models: each ControlNet on the models of its family only,
    loaded again with its model after an unload (--max-resident-models 1)."""
    from tests.fixtures.controlnets import build_tiny_controlnets
    from tests.integration.test_controls import control

    folders = build_tiny_controlnets(tmp_path)
    async with start_server(
        model=TWO_MODELS,
        controlnets=(f"scribble={folders['tiny']}", f"lines={folders['tiny-sdxl']}"),
        max_resident_models=1,
    ) as server:
        client = await open_client(server.ws_url)
        welcome = client.welcome
        assert "controls" in welcome.features and welcome.limits.max_controls == 3
        sd, xl = welcome.models
        assert (sd.controlnets, xl.controlnets) == (["scribble"], ["lines"])
        error = await rejection(client, "wrong", model="xl", controls=[control()])
        assert (error.code, error.field) == ("invalid_request", "params.controls.0.name")
        assert "lines" in error.message
        for job_id, model, name in (("xl", "xl", "lines"), ("sd", "sd", "scribble")):
            steered = await run(client, job_id, model=model, controls=[control(name=name)], **JOB)
            plain = (await run(client, f"{job_id}-plain", model=model, **JOB))[-1]
            assert isinstance(steered[-1], Complete), steered[-1]
            assert isinstance(plain, Complete), plain
            assert steered[-1].images[0].data != plain.images[0].data, f"{name} did nothing"
        assert model_metric(server, "latentcast_model_loads_total", "sd") == 2, "sd came back"
        await client.close()
