"""LoRA per job, TAESD previews and the loading paths, through a real server."""

from __future__ import annotations

from pathlib import Path

import pytest

from latentcast.protocol import Complete, ImagePreview
from latentcast.server.models import build_tiny_pipeline, build_tiny_sdxl_pipeline
from tests.fixtures.loras import build_tiny_lora
from tests.fixtures.single_file import save_sd1_single_file, save_sdxl_single_file
from tests.fixtures.taesd import build_tiny_taesd
from tests.integration.test_breadth import MODELS, noise, png, run
from tests.support import open_client


@pytest.mark.parametrize("model_name", MODELS)
async def test_a_lora_applies_to_its_job_only(start_server, tmp_path: Path, model_name) -> None:
    lora = build_tiny_lora(tmp_path / "lora", sdxl=model_name == "tiny-sdxl")
    async with start_server(model=model_name, loras=(f"style={lora}",)) as server:
        client = await open_client(server.ws_url)
        assert client.welcome.model.loras == ["style"]
        before = (await run(client, "before"))[-1].images[0].data
        styled = (await run(client, "styled", loras=[{"name": "style", "scale": 1.0}]))[-1]
        # Straight after the styled job: a job at scale 0 in between would hide a LoRA
        # left active.
        after = (await run(client, "after"))[-1].images[0].data
        zero = (await run(client, "zero", loras=[{"name": "style", "scale": 0}]))[-1]
        # The same LoRA job between jobs of other kinds gives the same bytes.
        await run(client, "img2img", init_image=png(noise(64, 64)), strength=0.5, steps=4)
        await run(client, "dpm", scheduler="dpmpp_2m_karras", steps=3)
        again = (await run(client, "again", loras=[{"name": "style", "scale": 1.0}]))[-1]
        assert again.images[0].data == styled.images[0].data
        assert styled.images[0].data != before
        assert zero.images[0].data == before
        assert after == before, "the next job is unaffected"
        await client.send(
            {"type": "submit", "id": "x", "params": {"prompt": "p", "loras": [{"name": "nope"}]}}
        )
        error = await client.recv()
        assert (error.code, error.field) == ("invalid_request", "params.loras.0.name")
        await client.close()


async def test_a_bad_lora_path_stops_the_server_with_a_clear_error(start_server, tmp_path) -> None:
    path = tmp_path / "nope.safetensors"
    with pytest.raises(RuntimeError, match="model failed to load") as failure:
        async with start_server(loras=(f"style={path}",)):
            pass
    # The error names the LoRA, its path and what is wrong with it.
    cause = str(failure.value.__cause__)
    assert "LoRA 'style'" in cause
    assert repr(str(path)) in cause
    assert "no such file or folder" in cause


async def test_a_preview_decoder_makes_full_size_image_previews(start_server, tmp_path) -> None:
    taesd = build_tiny_taesd(tmp_path / "taesd")
    async with start_server(preview_decoder=taesd) as server:
        client = await open_client(server.ws_url)
        messages = await run(
            client,
            "j",
            steps=3,
            width=64,
            height=64,
            preview={"kind": "image", "max_side": 64, "format": "jpeg"},
        )
        previews = [m for m in messages if isinstance(m, ImagePreview)]
        assert [(p.width, p.height) for p in previews] == [(64, 64), (64, 64)]
        # Default max_side: the latent's own size, as the protocol says.
        default = await run(client, "k", steps=2, preview={"kind": "image"})
        assert [(p.width, p.height) for p in default if isinstance(p, ImagePreview)] == [(8, 8)]
        await client.close()


@pytest.mark.parametrize(
    ("model_name", "save"),
    [
        ("tiny", lambda path: save_sd1_single_file(build_tiny_pipeline(), path)),
        ("tiny-sdxl", lambda path: save_sdxl_single_file(build_tiny_sdxl_pipeline(), path)),
    ],
)
async def test_loading_paths_give_the_same_images(
    start_server, model_cache, tmp_path, model_name, save
) -> None:
    """The built-in name, its saved folder, and a single-file checkpoint: same bytes."""
    from latentcast.server.models import tiny_model_dir

    folder = tiny_model_dir(model_cache, model_name)
    checkpoint = save(tmp_path / "model.safetensors")
    images = {}
    for label, options in {
        "name": {"model": model_name},
        "folder": {"model": str(folder)},
        "single-file": {"model": str(checkpoint), "checkpoint_config": model_name},
    }.items():
        async with start_server(**options) as server:
            client = await open_client(server.ws_url)
            complete = (await run(client, "j"))[-1]
            assert isinstance(complete, Complete)
            images[label] = complete.images[0].data
            await client.close()
    assert images["folder"] == images["name"]
    assert images["single-file"] == images["name"]


async def test_a_hub_id_offline_fails_with_what_to_do(start_server, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match="model failed to load") as failure:
        async with start_server(model="someone/some-model"):
            pass
    cause = str(failure.value.__cause__)
    # Why (offline, and not in the local cache) and what to do (download, pass a path).
    assert "'someone/some-model'" in cause
    assert "hub access is disabled (HF_HUB_OFFLINE)" in cause
    assert "not in the local Hugging Face cache" in cause
    assert "download it first and pass --model PATH" in cause
