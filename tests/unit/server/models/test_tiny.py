"""Unit tests for latentcast.server.models.tiny: the tiny model builders and their cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import latentcast.server.models.tiny as tiny_module
from latentcast.server.models import (
    build_tiny_inpaint_pipeline,
    build_tiny_pipeline,
    build_tiny_sdxl_pipeline,
    default_cache_dir,
    tiny_model_dir,
)


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
    build_tiny_sdxl_pipeline()
    assert torch.equal(torch.rand(4), expected)


def test_tiny_pipeline_structure() -> None:
    pipe = build_tiny_pipeline()
    assert type(pipe).__name__ == "StableDiffusionPipeline"
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


def test_tiny_sdxl_pipeline_structure() -> None:
    pipe = build_tiny_sdxl_pipeline()
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time"
    hidden = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.cross_attention_dim == hidden
    assert (
        unet.projection_class_embeddings_input_dim
        == 6 * unet.addition_time_embed_dim + pipe.text_encoder_2.config.projection_dim
    )
    assert pipe.vae_scale_factor == 8
    assert pipe.vae.config.latent_channels == 4
    assert pipe.vae.config.scaling_factor == pytest.approx(0.13025)
    scheduler = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (scheduler.beta_start, scheduler.beta_end) == pytest.approx((0.00085, 0.012))
    assert scheduler.beta_schedule == "scaled_linear"
    assert scheduler.timestep_spacing == "leading"
    assert scheduler.steps_offset == 1
    assert pipe.tokenizer("a cat").input_ids == pipe.tokenizer_2("a cat").input_ids


def test_tiny_inpaint_pipeline_structure() -> None:
    pipe = build_tiny_inpaint_pipeline()
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline"
    assert pipe.unet.config.in_channels == 9
    assert pipe.unet.config.out_channels == 4
    assert pipe.vae.config.latent_channels == 4


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

    monkeypatch.setattr(tiny_module, "build_tiny_pipeline", must_not_build)
    assert tiny_model_dir(cache) == folder
    assert index.stat().st_mtime_ns == stamp


def test_tiny_model_dir_names(tiny_cache: Path) -> None:
    version = tiny_module.TINY_MODEL_VERSION
    for name, class_name in (
        ("tiny", "StableDiffusionPipeline"),
        ("tiny-sdxl", "StableDiffusionXLPipeline"),
        ("tiny-inpaint", "StableDiffusionInpaintPipeline"),
    ):
        folder = tiny_model_dir(tiny_cache, name)
        assert folder == tiny_cache / f"{name}-{version}"
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == class_name
    assert tiny_model_dir(tiny_cache, "tiny-sdxl").name == "tiny-sdxl-v1"
    with pytest.raises(ValueError, match="unknown tiny model"):
        tiny_model_dir(tiny_cache, "tiny-flux")


def test_tiny_model_dir_crash_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash() -> None:
        raise RuntimeError("simulated crash while building")

    monkeypatch.setattr(tiny_module, "build_tiny_sdxl_pipeline", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_model_dir(tmp_path, "tiny-sdxl")
    assert list(tmp_path.iterdir()) == []


def test_tiny_model_dir_lost_race_keeps_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_build = tiny_module.build_tiny_pipeline
    target = tmp_path / f"tiny-{tiny_module.TINY_MODEL_VERSION}"

    def build_while_another_process_finishes() -> object:
        pipe = real_build()
        pipe.save_pretrained(target)  # the "other process" wins the race
        (target / "winner.txt").write_text("other process")
        return pipe

    monkeypatch.setattr(tiny_module, "build_tiny_pipeline", build_while_another_process_finishes)
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
