"""Unit tests for latentcast.server.models (tiny model, loading, devices, schedulers)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from latentcast.server import models
from latentcast.server.models import (
    SD1_FAMILY,
    LoadedModel,
    ModelLoadError,
    build_tiny_pipeline,
    default_cache_dir,
    default_dtype,
    load_model,
    resolve_device,
    tiny_model_dir,
)


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache dir holding the saved tiny model, shared by this module's tests."""
    cache = tmp_path_factory.mktemp("latentcast-cache")
    tiny_model_dir(cache)
    return cache


@pytest.fixture(scope="module")
def tiny(tiny_cache: Path) -> LoadedModel:
    return load_model("tiny", device="cpu", cache_dir=tiny_cache)


def _leftover_staging_dirs(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------ tiny build


def test_tiny_build_is_deterministic() -> None:
    first = build_tiny_pipeline()
    second = build_tiny_pipeline()
    for name in ("unet", "vae", "text_encoder"):
        state_a = getattr(first, name).state_dict()
        state_b = getattr(second, name).state_dict()
        assert state_a.keys() == state_b.keys()
        for key, tensor in state_a.items():
            assert torch.equal(tensor, state_b[key]), f"{name}.{key} differs between builds"


def test_tiny_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    build_tiny_pipeline()
    assert torch.equal(torch.rand(4), expected)


def test_tiny_pipeline_structure() -> None:
    pipe = build_tiny_pipeline()
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == 4
    assert pipe.unet.config.in_channels == 4
    assert pipe.safety_checker is None
    scheduler = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert scheduler.beta_schedule == "scaled_linear"
    assert scheduler.beta_start == pytest.approx(0.00085)
    assert scheduler.beta_end == pytest.approx(0.012)
    assert scheduler.num_train_timesteps == 1000
    assert scheduler.steps_offset == 1
    assert scheduler.timestep_spacing == "leading"
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)


def test_tiny_tokenizer_is_real_and_round_trips(tmp_path: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = build_tiny_pipeline().tokenizer
    ids = tokenizer("a photo of a cat").input_ids
    assert len(set(ids)) > 2
    assert ids[0] == tokenizer.bos_token_id
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.model_max_length == 77
    # Byte-level fallback: any text (accents, emoji) tokenizes without unknowns.
    odd = tokenizer("crème brûlée 🍰").input_ids
    assert len(odd) > 4

    tokenizer.save_pretrained(tmp_path / "tok")
    loaded = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    assert loaded("a photo of a cat").input_ids == ids
    assert loaded("crème brûlée 🍰").input_ids == odd
    assert loaded.model_max_length == 77


# ------------------------------------------------------------------------ tiny cache


def test_tiny_model_dir_builds_once_and_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    folder = tiny_model_dir(cache)
    assert folder.parent == cache
    assert "tiny-v" in folder.name
    index = folder / "model_index.json"
    assert index.is_file()
    assert _leftover_staging_dirs(cache) == []
    stamp = index.stat().st_mtime_ns

    def must_not_build() -> None:
        raise AssertionError("tiny model rebuilt although it is cached")

    monkeypatch.setattr(models, "build_tiny_pipeline", must_not_build)
    assert tiny_model_dir(cache) == folder
    assert index.stat().st_mtime_ns == stamp


def test_tiny_model_dir_crash_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash() -> None:
        raise RuntimeError("simulated crash while building")

    monkeypatch.setattr(models, "build_tiny_pipeline", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_model_dir(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_tiny_model_dir_lost_race_keeps_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = models.build_tiny_pipeline
    target = tmp_path / f"tiny-{models.TINY_MODEL_VERSION}"

    def build_while_another_process_finishes() -> object:
        pipe = real_build()
        pipe.save_pretrained(target)  # the "other process" wins the race
        (target / "winner.txt").write_text("other process")
        return pipe

    monkeypatch.setattr(models, "build_tiny_pipeline", build_while_another_process_finishes)
    assert tiny_model_dir(tmp_path) == target
    assert (target / "winner.txt").read_text() == "other process"
    assert _leftover_staging_dirs(tmp_path) == []


def test_default_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LATENTCAST_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("LATENTCAST_CACHE_DIR")
    assert default_cache_dir() == tmp_path / "xdg" / "latentcast"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "latentcast"


# --------------------------------------------------------------------------- loading


def test_load_tiny(tiny: LoadedModel) -> None:
    assert tiny.name == "tiny"
    assert tiny.family is SD1_FAMILY
    assert tiny.family.name == "sd1"
    assert tiny.device == torch.device("cpu")
    assert tiny.dtype == torch.float32
    assert tiny.latent_channels == 4
    assert tiny.vae_scale_factor == 8
    assert tiny.default_size == 64
    assert tiny.schedulers == ("euler",)
    assert tiny.default_scheduler == "euler"
    assert tiny.pipeline.safety_checker is None
    assert tiny.pipeline.unet.dtype == torch.float32


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
    assert loaded.pipeline.unet.dtype == torch.bfloat16
    assert loaded.pipeline.vae.dtype == torch.bfloat16


def test_load_rejects_bad_dtype(tiny_cache: Path) -> None:
    with pytest.raises(ValueError, match="float8"):
        load_model("tiny", device="cpu", dtype="float8", cache_dir=tiny_cache)


def test_generation_is_deterministic(tiny: LoadedModel) -> None:
    def generate() -> np.ndarray:
        result = tiny.pipeline(
            "a photo of a cat",
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
    assert str(missing) in str(info.value)


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


def test_load_file_with_wrong_suffix(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match=r"\.safetensors or \.ckpt"):
        load_model(str(weights), device="cpu")


# --------------------------------------------------------------------------- devices


def test_resolve_device_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@pytest.mark.skipif(
    torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a CPU-only host"
)
def test_resolve_device_auto_and_unavailable() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    for spec in ("cuda", "cuda:1", "mps"):
        with pytest.raises(ValueError, match="not available"):
            resolve_device(spec)


@pytest.mark.parametrize("spec", ["gpu0", "", "cuda:x", "meta"])
def test_resolve_device_invalid(spec: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        resolve_device(spec)


def test_default_dtype() -> None:
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.float16
    assert default_dtype(torch.device("mps")) == torch.float16


# ------------------------------------------------------------------------ schedulers


def test_make_scheduler_returns_fresh_instances(tiny: LoadedModel) -> None:
    from diffusers import EulerDiscreteScheduler

    first = tiny.make_scheduler("euler")
    second = tiny.make_scheduler("euler")
    assert isinstance(first, EulerDiscreteScheduler)
    assert first is not second
    assert first is not tiny.pipeline.scheduler
    assert first.config.timestep_spacing == "leading"
    assert first.config.steps_offset == 1
    first.set_timesteps(4)
    second.set_timesteps(10)
    assert len(first.timesteps) == 4
    assert len(second.timesteps) == 10


def test_make_scheduler_unknown_name(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="dpm-bogus"):
        tiny.make_scheduler("dpm-bogus")


def test_sd1_family_factors() -> None:
    assert SD1_FAMILY.latent_rgb is not None
    assert len(SD1_FAMILY.latent_rgb.factors) == 4
    assert all(len(row) == 3 for row in SD1_FAMILY.latent_rgb.factors)
    assert SD1_FAMILY.latent_rgb.factors[0] == (0.3512, 0.2297, 0.3227)
    assert SD1_FAMILY.latent_rgb.bias == (0.0, 0.0, 0.0)


def test_module_import_is_cheap() -> None:
    # models must not pull diffusers/transformers in at import time (lazy imports),
    # checked in a fresh interpreter.
    code = (
        "import sys, latentcast.server.models, latentcast.server.previews; "
        "print('diffusers' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False False"
