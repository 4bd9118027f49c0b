"""Unit tests for latentcast.server.models.loras: loading LoRA adapters and selecting them
per job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from latentcast.server.models import LoadedModel, ModelLoadError, load_model
from tests.fixtures.loras import build_tiny_lora
from tests.unit.server.models.support import PROMPT, _generate, _init_image


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRAs for the tiny model: one given as a file, one as a folder."""
    root = tmp_path_factory.mktemp("loras")
    file = build_tiny_lora(root / "a", seed=1)
    folder = build_tiny_lora(root / "b", seed=2).parent
    # A name with "." on purpose: peft rejects it as an adapter name.
    return {"detail.v1": file, "style": folder}


@pytest.fixture(scope="module")
def tiny_lora(tiny_cache: Path, lora_files: dict[str, Path]) -> LoadedModel:
    return load_model("tiny", device="cpu", cache_dir=tiny_cache, loras=lora_files)


def test_loras_are_listed_and_inactive_after_load(
    tiny: LoadedModel, tiny_lora: LoadedModel
) -> None:
    assert tiny_lora.loras == ("detail.v1", "style")
    # Loaded but inactive: exactly the images of the model without any LoRA.
    assert np.array_equal(_generate(tiny_lora), _generate(tiny))


def _img2img(model: LoadedModel) -> np.ndarray:
    image: np.ndarray = model.pipeline_for("img2img")(
        PROMPT,
        image=_init_image(),
        strength=0.75,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(3),
        output_type="np",
    ).images[0]
    return image


def test_activate_loras(tiny: LoadedModel, tiny_lora: LoadedModel) -> None:
    base = _generate(tiny)
    try:
        tiny_lora.activate_loras([("style", 1.0)])
        styled = _generate(tiny_lora)
        assert not np.array_equal(styled, base)
        tiny_lora.activate_loras([("style", 1.0)])  # unchanged selection: a no-op
        assert np.array_equal(_generate(tiny_lora), styled)

        tiny_lora.activate_loras([("detail.v1", 1.0)])
        detailed = _generate(tiny_lora)
        assert not np.array_equal(detailed, styled)
        tiny_lora.activate_loras([("detail.v1", 1.0), ("style", 0.5)])
        both = _generate(tiny_lora)
        assert not np.array_equal(both, detailed)

        tiny_lora.activate_loras([("style", 0.0)])
        assert np.array_equal(_generate(tiny_lora), base)

        # Shared modules: the other modes' pipelines see the selection too.
        tiny_lora.activate_loras([("style", 1.0)])
        styled_img2img = _img2img(tiny_lora)
        tiny_lora.activate_loras([])
        assert not np.array_equal(_img2img(tiny_lora), styled_img2img)
        assert np.array_equal(_img2img(tiny_lora), _img2img(tiny))
        tiny_lora.activate_loras([("style", 1.0)])
    finally:
        tiny_lora.activate_loras([])
    # After a job with the LoRA, the empty selection gives the original image again.
    assert np.array_equal(_generate(tiny_lora), base)


def test_sdxl_lora(tiny_sdxl: LoadedModel, tiny_cache: Path, tmp_path: Path) -> None:
    lora = build_tiny_lora(tmp_path / "xl", sdxl=True)
    model = load_model("tiny-sdxl", device="cpu", cache_dir=tiny_cache, loras={"xl": lora})
    assert model.loras == ("xl",)
    base = _generate(tiny_sdxl)
    assert np.array_equal(_generate(model), base)
    model.activate_loras([("xl", 1.0)])
    assert not np.array_equal(_generate(model), base)
    model.activate_loras([])
    assert np.array_equal(_generate(model), base)


def test_activate_loras_rejects_bad_selections(tiny: LoadedModel, tiny_lora: LoadedModel) -> None:
    with pytest.raises(ValueError, match="unknown LoRA 'nope'"):
        tiny_lora.activate_loras([("nope", 1.0)])
    with pytest.raises(ValueError, match="twice"):
        tiny_lora.activate_loras([("style", 1.0), ("style", 0.5)])
    with pytest.raises(ValueError, match="finite"):
        tiny_lora.activate_loras([("style", float("nan"))])
    with pytest.raises(ValueError, match="none loaded"):
        tiny.activate_loras([("style", 1.0)])
    tiny.activate_loras([])  # no adapters at all: fine


def test_lora_load_errors_name_the_lora(tiny_cache: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(ModelLoadError, match="no such file") as info:
        load_model("tiny", device="cpu", cache_dir=tiny_cache, loras={"ghost": missing})
    assert "'ghost'" in str(info.value)
    assert str(missing) in str(info.value)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="'junk'") as info:
        load_model("tiny", device="cpu", cache_dir=tiny_cache, loras={"junk": garbage})
    assert str(garbage) in str(info.value)

    # A LoRA for another architecture (tiny-sdxl): shapes do not fit.
    sdxl_lora = build_tiny_lora(tmp_path / "xl", sdxl=True)
    with pytest.raises(ModelLoadError, match=r"'xl'(.|\n)*size mismatch"):
        load_model("tiny", device="cpu", cache_dir=tiny_cache, loras={"xl": sdxl_lora})

    # A LoRA whose keys match nothing of this model.
    renamed = tmp_path / "renamed.safetensors"
    weights = load_file(str(build_tiny_lora(tmp_path / "ok")))
    save_file({key.replace("unet.", "foo.", 1): value for key, value in weights.items()}, renamed)
    with pytest.raises(ModelLoadError, match=r"'odd'.*holds no LoRA weights"):
        load_model("tiny", device="cpu", cache_dir=tiny_cache, loras={"odd": renamed})
