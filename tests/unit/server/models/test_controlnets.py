"""Unit tests for latentcast.server.models.controlnets: loading ControlNets with a model
and refusing those of another family."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from latentcast.server.models import LoadedModel, ModelLoadError, load_model
from latentcast.server.models.controlnets import MAX_CONTROLS_PER_JOB, ControlNetFamilyMismatch
from tests.fixtures.controlnets import build_tiny_controlnets


@pytest.fixture(scope="module")
def controlnet_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_tiny_controlnets(tmp_path_factory.mktemp("controlnets"))


@pytest.fixture(scope="module")
def tiny_controlled(tiny_cache: Path, controlnet_folders: dict[str, Path]) -> LoadedModel:
    return load_model(
        "tiny",
        device="cpu",
        cache_dir=tiny_cache,
        controlnets={
            "scribble": controlnet_folders["tiny"],
            "edges.v1": controlnet_folders["tiny"],
        },
    )


def test_controlnets_are_listed_sorted_on_the_models_device_and_dtype(
    tiny_controlled: LoadedModel,
) -> None:
    assert tiny_controlled.controlnets == ("edges.v1", "scribble")
    module = tiny_controlled.controlnet("scribble")
    assert type(module).__name__ == "ControlNetModel"
    assert module.dtype == tiny_controlled.dtype == torch.float32
    assert module.device == tiny_controlled.device
    assert not module.training
    # Two names, two modules (each job names the one it wants).
    assert tiny_controlled.controlnet("edges.v1") is not module
    with pytest.raises(ValueError, match=r"unknown ControlNet 'nope'; available: edges\.v1, scr"):
        tiny_controlled.controlnet("nope")
    assert MAX_CONTROLS_PER_JOB == 3


def test_a_model_without_controlnets_has_none(tiny: LoadedModel) -> None:
    assert tiny.controlnets == ()
    with pytest.raises(ValueError, match="none loaded"):
        tiny.controlnet("scribble")


def test_sdxl_takes_an_sdxl_controlnet(
    tiny_cache: Path, controlnet_folders: dict[str, Path]
) -> None:
    model = load_model(
        "tiny-sdxl",
        device="cpu",
        cache_dir=tiny_cache,
        controlnets={"scribble": controlnet_folders["tiny-sdxl"]},
    )
    assert model.controlnets == ("scribble",)
    assert model.controlnet("scribble").config.addition_embed_type == "text_time"


@pytest.mark.parametrize(
    ("model", "other"),
    [("tiny", "tiny-sdxl"), ("tiny-sdxl", "tiny")],
    ids=["sd1-model", "sdxl-model"],
)
def test_a_controlnet_of_another_family_is_a_startup_error_naming_the_option(
    tiny_cache: Path, controlnet_folders: dict[str, Path], model: str, other: str
) -> None:
    folder = controlnet_folders[other]
    with pytest.raises(ModelLoadError) as info:
        load_model(model, device="cpu", cache_dir=tiny_cache, controlnets={"cn": folder})
    message = str(info.value)
    assert f"--controlnet cn={folder}" in message
    assert f"not for model {model!r}" in message
    assert "cross-attention dim" in message or "added conditioning" in message


def test_a_server_of_several_families_may_skip_the_others_controlnets(
    tiny_cache: Path, controlnet_folders: dict[str, Path]
) -> None:
    both = {
        "sd1-scribble": controlnet_folders["tiny"],
        "xl-scribble": controlnet_folders["tiny-sdxl"],
    }
    for model, kept in (("tiny", "sd1-scribble"), ("tiny-sdxl", "xl-scribble")):
        loaded = load_model(
            model, device="cpu", cache_dir=tiny_cache, controlnets=both, skip_other_families=True
        )
        assert loaded.controlnets == (kept,)
    with pytest.raises(ControlNetFamilyMismatch):
        load_model("tiny", device="cpu", cache_dir=tiny_cache, controlnets=both)


def test_missing_and_unreadable_controlnets_are_named(tmp_path: Path, tiny_cache: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(ModelLoadError, match=r"--controlnet cn=.*missing: no such file"):
        load_model("tiny", device="cpu", cache_dir=tiny_cache, controlnets={"cn": missing})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match=r"--controlnet cn=.*empty: could not load a Contr"):
        load_model("tiny", device="cpu", cache_dir=tiny_cache, controlnets={"cn": empty})
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match=r"not a \.safetensors, \.ckpt or \.pth file"):
        load_model("tiny", device="cpu", cache_dir=tiny_cache, controlnets={"cn": text})


def test_a_single_file_with_its_config_beside_it_loads_offline(
    tmp_path: Path,
    tiny_cache: Path,
    controlnet_folders: dict[str, Path],
    tiny_controlled: LoadedModel,
) -> None:
    """A .safetensors file (diffusers keys) next to its config.json: from_single_file with
    that folder as the config, no hub."""
    folder = tmp_path / "single"
    folder.mkdir()
    source = controlnet_folders["tiny"]
    shutil.copy(source / "config.json", folder / "config.json")
    weights = folder / "scribble.safetensors"
    shutil.copy(source / "diffusion_pytorch_model.safetensors", weights)
    model = load_model("tiny", device="cpu", cache_dir=tiny_cache, controlnets={"s": weights})
    loaded = model.controlnet("s").state_dict()
    reference = tiny_controlled.controlnet("scribble").state_dict()
    assert loaded.keys() == reference.keys()
    assert all(torch.equal(loaded[key], reference[key]) for key in reference)


def test_a_single_file_without_its_config_says_what_to_do_offline(
    tmp_path: Path, tiny_cache: Path, controlnet_folders: dict[str, Path]
) -> None:
    weights = tmp_path / "scribble.safetensors"
    shutil.copy(controlnet_folders["tiny"] / "diffusion_pytorch_model.safetensors", weights)
    with pytest.raises(ModelLoadError, match=r"put the ControlNet's config\.json beside it"):
        load_model("tiny", device="cpu", cache_dir=tiny_cache, controlnets={"s": weights})
