"""Unit tests for latentcast.server.models.loading: load_model from tiny names, folders,
single-file checkpoints and hub ids, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentcast.server.models import (
    MODES,
    SD1_FAMILY,
    SDXL_FAMILY,
    LoadedModel,
    ModelLoadError,
    available_schedulers,
    load_model,
    tiny_model_dir,
)
from tests.fixtures.single_file import save_sd1_single_file, save_sdxl_single_file
from tests.unit.server.models.support import PROMPT, _generate


def test_load_tiny(tiny: LoadedModel) -> None:
    assert tiny.name == "tiny"
    assert tiny.family is SD1_FAMILY
    assert tiny.family.name == "sd1"
    assert tiny.device == torch.device("cpu")
    assert tiny.dtype == torch.float32
    assert tiny.latent_channels == 4
    assert tiny.vae_scale_factor == 8
    assert tiny.default_size == 64
    assert tiny.schedulers == available_schedulers()
    assert tiny.schedulers[0] == "euler"
    assert tiny.default_scheduler == "euler"
    assert tiny.modes == MODES == ("txt2img", "img2img", "inpaint")
    assert tiny.inpaint_unet is False
    assert tiny.loras == ()
    assert tiny.preview_decoder is None
    assert tiny.pipeline.safety_checker is None
    assert tiny.pipeline.unet.dtype == torch.float32


def test_load_tiny_sdxl(tiny_sdxl: LoadedModel, tiny_cache: Path) -> None:
    assert tiny_sdxl.name == "tiny-sdxl"
    assert tiny_sdxl.family is SDXL_FAMILY
    assert type(tiny_sdxl.pipeline).__name__ == "StableDiffusionXLPipeline"
    assert tiny_sdxl.pipeline.name_or_path == str(tiny_model_dir(tiny_cache, "tiny-sdxl"))
    assert tiny_sdxl.default_size == 64
    assert tiny_sdxl.latent_channels == 4
    assert tiny_sdxl.vae_scale_factor == 8
    assert tiny_sdxl.modes == MODES
    assert tiny_sdxl.inpaint_unet is False


def test_tiny_sdxl_generates_deterministically(tiny_sdxl: LoadedModel) -> None:
    # Its speed is a benchmark's business (bench/), not a unit test's.
    first = _generate(tiny_sdxl)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, _generate(tiny_sdxl))
    assert not np.array_equal(first, _generate(tiny_sdxl, seed=43))


def test_load_saved_folder_like_a_real_model(tiny_cache: Path) -> None:
    folder = tiny_model_dir(tiny_cache)
    loaded = load_model(str(folder), device="cpu")
    assert loaded.name == str(folder)
    assert loaded.vae_scale_factor == 8
    assert loaded.latent_channels == 4
    assert loaded.family.name == "sd1"
    assert loaded.default_size == 64


def test_load_tiny_with_explicit_dtype(tiny_cache: Path) -> None:
    loaded = load_model("tiny", device="cpu", dtype="bfloat16", cache_dir=tiny_cache)
    assert loaded.dtype == torch.bfloat16
    for mode in loaded.modes:
        pipeline = loaded.pipeline_for(mode)
        # from_pipe would cast the shared modules to float32 unless told the dtype.
        assert pipeline.unet.dtype == torch.bfloat16
        assert pipeline.vae.dtype == torch.bfloat16
        assert pipeline.text_encoder.dtype == torch.bfloat16


def test_load_rejects_bad_dtype(tiny_cache: Path) -> None:
    with pytest.raises(ValueError, match="float8"):
        load_model("tiny", device="cpu", dtype="float8", cache_dir=tiny_cache)


def test_generation_is_deterministic(tiny: LoadedModel) -> None:
    def generate() -> np.ndarray:
        result = tiny.pipeline(
            PROMPT,
            num_inference_steps=2,
            height=64,
            width=64,
            generator=torch.Generator("cpu").manual_seed(42),
        )
        image = result.images[0]
        assert image.size == (64, 64)
        return np.asarray(image)

    first = generate()
    second = generate()
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, second)


def test_load_missing_path_is_helpful(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no such file or folder") as info:
        load_model(str(missing), device="cpu")
    message = str(info.value)
    assert str(missing) in message
    assert "tiny-sdxl" in message
    # The server's log line says "could not load model '...': <this message>".
    assert "could not load model" not in message


@pytest.mark.parametrize(
    ("name", "data", "detail"),
    [
        ("random.safetensors", bytes(range(256)) * 8, "header too large"),
        ("empty.safetensors", b"", "the file is empty"),
        ("page.safetensors", b"<html><body>Not Found</body></html>\n", "header too large"),
        (
            "partial.safetensors",
            b"<\0\0\0\0\0\0\0" + b'{"w":{"dtype":"F32","shape":[100],"data_offsets":[0,400]}}',
            "safetensors:",
        ),
        ("page.ckpt", b"<html><body>Not Found</body></html>\n", "neither a zip archive"),
    ],
)
@pytest.mark.parametrize("model_config", [None, "tiny"])
def test_load_corrupt_checkpoint_names_the_file(
    name: str,
    data: bytes,
    detail: str,
    model_config: str | None,
    tmp_path: Path,
    tiny_cache: Path,
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ModelLoadError, match="is not a valid checkpoint file") as info:
        load_model(str(path), device="cpu", cache_dir=tiny_cache, model_config=model_config)
    message = str(info.value)
    assert repr(str(path)) in message
    assert detail in message
    assert "Stable Diffusion" in message and "download it again" in message
    assert "could not load model" not in message
    # Said once, not also blamed on the model config or on the offline hub.
    assert message.count("not a valid checkpoint") == 1
    assert "--model-config" not in message


def test_load_unknown_hub_id_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.chdir(tmp_path)  # so the id cannot resolve to a local folder
    with pytest.raises(ModelLoadError) as info:
        load_model("latentcast-tests/definitely-not-a-model", device="cpu")
    message = str(info.value)
    assert "latentcast-tests/definitely-not-a-model" in message
    assert "download it first" in message
    assert "--model PATH" in message
    assert info.value.__cause__ is not None


def test_load_folder_that_is_not_a_pipeline(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        load_model(str(tmp_path), device="cpu")


def test_load_folder_of_an_unsupported_pipeline(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(ModelLoadError, match=r"FluxPipeline.*SDXL"):
        load_model(str(tmp_path), device="cpu")


def test_load_file_with_wrong_suffix(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match=r"\.safetensors or \.ckpt"):
        load_model(str(weights), device="cpu")


# ------------------------------------------------------------------------- single file


@pytest.fixture(scope="module")
def tiny_single_file(tiny: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("single-file") / "tiny.safetensors"
    return save_sd1_single_file(tiny.pipeline, path)


@pytest.fixture(scope="module")
def tiny_sdxl_single_file(tiny_sdxl: LoadedModel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("single-file") / "tiny-sdxl.safetensors"
    return save_sdxl_single_file(tiny_sdxl.pipeline, path)


def test_single_file_checkpoint_in_ldm_layout(
    tiny_single_file: Path, tiny_sdxl_single_file: Path
) -> None:
    from safetensors import safe_open

    with safe_open(str(tiny_single_file), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "model.diffusion_model.middle_block.1.proj_in.weight" in keys
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys
    assert "first_stage_model.encoder.down.0.block.0.conv1.weight" in keys
    assert any(key.startswith("cond_stage_model.transformer.text_model.") for key in keys)
    assert not any(key.startswith(("unet.", "vae.", "text_encoder.")) for key in keys)

    with safe_open(str(tiny_sdxl_single_file), framework="pt") as handle:
        keys = set(handle.keys())
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert any(key.startswith("conditioner.embedders.0.transformer.text_model.") for key in keys)


@pytest.mark.parametrize(
    ("reference", "checkpoint", "config"),
    [
        ("tiny", "tiny_single_file", "tiny"),
        ("tiny", "tiny_single_file", "folder"),
        ("tiny_sdxl", "tiny_sdxl_single_file", "tiny-sdxl"),
    ],
)
def test_single_file_loads_offline_like_the_folder(
    reference: str, checkpoint: str, config: str, tiny_cache: Path, request: pytest.FixtureRequest
) -> None:
    folder_model: LoadedModel = request.getfixturevalue(reference)
    path: Path = request.getfixturevalue(checkpoint)
    model_config = str(tiny_model_dir(tiny_cache)) if config == "folder" else config
    loaded = load_model(str(path), device="cpu", cache_dir=tiny_cache, model_config=model_config)
    assert loaded.name == str(path)
    assert loaded.family is folder_model.family
    assert type(loaded.pipeline) is type(folder_model.pipeline)
    assert loaded.modes == MODES
    components = ["unet", "vae", "text_encoder"]
    if folder_model.family is SDXL_FAMILY:
        components.append("text_encoder_2")
    for component in components:
        state = getattr(loaded.pipeline, component).state_dict()
        reference_state = getattr(folder_model.pipeline, component).state_dict()
        assert state.keys() == reference_state.keys()
        for key, tensor in reference_state.items():
            assert torch.equal(state[key], tensor), f"{component}.{key}"
    # Same weights (renames and lossless reshapes only), configs, tokenizers and
    # scheduler: the very same image.
    assert np.array_equal(_generate(loaded), _generate(folder_model))


def test_single_file_without_config_offline(
    tiny_single_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="--model-config") as info:
        load_model(str(tiny_single_file), device="cpu")
    assert str(tiny_single_file) in str(info.value)


def test_single_file_with_a_bad_config(tiny_single_file: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not a diffusers folder"):
        load_model(str(tiny_single_file), device="cpu", model_config=tmp_path)
