"""Unit tests for latentcast.server.models.

Tiny models, families, modes sharing weights, schedulers, LoRAs, the preview decoder,
single-file checkpoints, devices. Models are built once (session cache from conftest)
and loaded once per module.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from latentcast.server import models
from latentcast.server.models import (
    MODES,
    SD1_FAMILY,
    SD2_FAMILY,
    SDXL_FAMILY,
    LoadedModel,
    ModelLoadError,
    available_schedulers,
    build_tiny_inpaint_pipeline,
    build_tiny_pipeline,
    build_tiny_sdxl_pipeline,
    default_cache_dir,
    default_dtype,
    detect_family,
    load_model,
    resolve_device,
    tiny_model_dir,
)
from tests.fixtures.loras import build_tiny_lora
from tests.fixtures.single_file import save_sd1_single_file, save_sdxl_single_file
from tests.fixtures.taesd import build_tiny_taesd

PROMPT = "a photo of a cat"


@pytest.fixture(scope="module")
def tiny_cache(model_cache: Path) -> Path:
    """The session's model cache (tiny built there by conftest; the others on demand)."""
    return model_cache


@pytest.fixture(scope="module")
def tiny(tiny_cache: Path) -> LoadedModel:
    return load_model("tiny", device="cpu", cache_dir=tiny_cache)


@pytest.fixture(scope="module")
def tiny_sdxl(tiny_cache: Path) -> LoadedModel:
    return load_model("tiny-sdxl", device="cpu", cache_dir=tiny_cache)


@pytest.fixture(scope="module")
def tiny_inpaint(tiny_cache: Path) -> LoadedModel:
    return load_model("tiny-inpaint", device="cpu", cache_dir=tiny_cache)


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


def _leftover_staging_dirs(cache: Path) -> list[Path]:
    return [p for p in cache.iterdir() if p.name.startswith(".")]


def _generate(
    model: LoadedModel, *, seed: int = 42, steps: int = 2, prompt: str = PROMPT, **kwargs: Any
) -> np.ndarray:
    """One 64x64 txt2img image as a float array (exact comparisons)."""
    result = model.pipeline(
        prompt,
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="np",
        **kwargs,
    )
    image: np.ndarray = result.images[0]
    return image


@contextmanager
def _scheduler_on(pipeline: Any, scheduler: Any) -> Iterator[None]:
    """Run with ``scheduler`` on a shared pipeline, restoring the old one after."""
    original = pipeline.scheduler
    pipeline.scheduler = scheduler
    try:
        yield
    finally:
        pipeline.scheduler = original


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

    monkeypatch.setattr(models, "build_tiny_pipeline", must_not_build)
    assert tiny_model_dir(cache) == folder
    assert index.stat().st_mtime_ns == stamp


def test_tiny_model_dir_names(tiny_cache: Path) -> None:
    version = models.TINY_MODEL_VERSION
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

    monkeypatch.setattr(models, "build_tiny_sdxl_pipeline", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tiny_model_dir(tmp_path, "tiny-sdxl")
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


# --------------------------------------------------------------------------- families


class _Config(dict[str, Any]):
    """A dict with attribute access, like diffusers' FrozenDict configs."""

    def __getattr__(self, name: str) -> Any:
        return self[name]


def _fake_pipeline(cls_name: str = "StableDiffusionPipeline", **unet_config: Any) -> Any:
    config = _Config(sample_size=64, cross_attention_dim=768, addition_embed_type=None)
    config.update(unet_config)
    fake_cls = type(cls_name, (), {})
    pipeline = fake_cls()
    pipeline.unet = SimpleNamespace(config=config)
    pipeline.vae_scale_factor = 8
    return pipeline


def test_detect_family_from_the_pipeline() -> None:
    assert detect_family(_fake_pipeline()) is SD1_FAMILY
    assert detect_family(_fake_pipeline(cross_attention_dim=1024, sample_size=96)) is SD2_FAMILY
    sd2_base = detect_family(_fake_pipeline(cross_attention_dim=1024, sample_size=64))
    assert (sd2_base.name, sd2_base.default_size) == ("sd2", 512)
    assert sd2_base.latent_rgb == SD2_FAMILY.latent_rgb
    text_time = _fake_pipeline(addition_embed_type="text_time", cross_attention_dim=2048)
    assert detect_family(text_time) is SDXL_FAMILY
    assert detect_family(_fake_pipeline("StableDiffusionXLImg2ImgPipeline")) is SDXL_FAMILY


def test_family_constants() -> None:
    assert (SD1_FAMILY.name, SD1_FAMILY.default_size) == ("sd1", 512)
    assert (SD2_FAMILY.name, SD2_FAMILY.default_size) == ("sd2", 768)
    assert (SDXL_FAMILY.name, SDXL_FAMILY.default_size) == ("sdxl", 1024)
    # SD 2.x shares SD 1.x's VAE; ComfyUI uses the SD15 latent format for it.
    assert SD2_FAMILY.latent_rgb == SD1_FAMILY.latent_rgb
    assert replace(SD2_FAMILY, default_size=512) != SD2_FAMILY


def test_sd1_family_factors() -> None:
    assert SD1_FAMILY.latent_rgb is not None
    assert len(SD1_FAMILY.latent_rgb.factors) == 4
    assert all(len(row) == 3 for row in SD1_FAMILY.latent_rgb.factors)
    assert SD1_FAMILY.latent_rgb.factors[0] == (0.3512, 0.2297, 0.3227)
    assert SD1_FAMILY.latent_rgb.bias == (0.0, 0.0, 0.0)


def test_sdxl_family_factors() -> None:
    # ComfyUI comfy/latent_formats.py, class SDXL.
    rgb = SDXL_FAMILY.latent_rgb
    assert rgb is not None
    assert rgb.factors == (
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    )
    assert rgb.bias == (0.1084, -0.0175, -0.0011)


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


# ------------------------------------------------------------------------------ modes


@pytest.mark.parametrize("model_name", ["tiny", "tiny_sdxl"])
def test_mode_pipelines_share_the_weights(model_name: str, request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue(model_name)
    sdxl = model.family is SDXL_FAMILY
    prefix = "StableDiffusionXL" if sdxl else "StableDiffusion"
    expected = {"txt2img": "Pipeline", "img2img": "Img2ImgPipeline", "inpaint": "InpaintPipeline"}
    assert model.pipeline_for("txt2img") is model.pipeline
    for mode in model.modes:
        pipeline = model.pipeline_for(mode)
        assert type(pipeline).__name__ == prefix + expected[mode]
        assert pipeline.unet is model.pipeline.unet
        assert pipeline.vae is model.pipeline.vae
        assert pipeline.text_encoder is model.pipeline.text_encoder
        if sdxl:
            assert pipeline.text_encoder_2 is model.pipeline.text_encoder_2
    assert model.pipeline_for("img2img") is model.pipeline_for("img2img")  # built once


def test_pipeline_for_unknown_mode(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="upscale"):
        tiny.pipeline_for("upscale")


def _init_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _mask(value: int) -> Image.Image:
    return Image.fromarray(np.full((64, 64), value, dtype=np.uint8))


@pytest.mark.parametrize("model_name", ["tiny", "tiny_sdxl"])
def test_img2img_and_inpaint_run(model_name: str, request: pytest.FixtureRequest) -> None:
    model: LoadedModel = request.getfixturevalue(model_name)
    common: dict[str, Any] = {"num_inference_steps": 4, "output_type": "np"}
    img2img = model.pipeline_for("img2img")(
        PROMPT,
        image=_init_image(),
        strength=0.5,
        generator=torch.Generator().manual_seed(1),
        **common,
    ).images[0]
    assert img2img.shape == (64, 64, 3)
    inpaint = model.pipeline_for("inpaint")
    images = [
        inpaint(
            prompt,
            image=_init_image(),
            mask_image=_mask(value),
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(1),
            **common,
        ).images[0]
        for prompt, value in ((PROMPT, 0), ("a dog", 0), (PROMPT, 255), ("a dog", 255))
    ]
    # 4-channel UNet: the kept region (black mask: all of it) is blended back from the
    # init image's latents at every step, so the prompt cannot change it ...
    assert np.array_equal(images[0], images[1])
    # ... while in a repainted region (white) the prompt matters.
    assert not np.array_equal(images[2], images[3])


def test_inpainting_unet_model(tiny_inpaint: LoadedModel) -> None:
    assert tiny_inpaint.inpaint_unet is True
    assert tiny_inpaint.modes == ("inpaint",)
    assert tiny_inpaint.family is SD1_FAMILY
    assert type(tiny_inpaint.pipeline).__name__ == "StableDiffusionInpaintPipeline"
    assert tiny_inpaint.pipeline_for("inpaint") is tiny_inpaint.pipeline
    for mode in ("txt2img", "img2img"):
        with pytest.raises(ValueError, match="not available"):
            tiny_inpaint.pipeline_for(mode)

    def inpaint(seed: int) -> np.ndarray:
        image: np.ndarray = tiny_inpaint.pipeline(
            PROMPT,
            image=_init_image(),
            mask_image=_mask(255),
            height=64,
            width=64,
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(seed),
            output_type="np",
        ).images[0]
        return image

    first = inpaint(5)
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first, inpaint(5))


# ------------------------------------------------------------------------ schedulers


def test_available_schedulers() -> None:
    names = available_schedulers()
    assert names[0] == "euler"
    for name in ("euler", "euler_a", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "unipc", "lcm"):
        assert name in names
    assert ("dpmpp_sde" in names) == (importlib.util.find_spec("torchsde") is not None)
    assert len(set(names)) == len(names)


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


def test_make_scheduler_classes_and_overrides(tiny: LoadedModel) -> None:
    expected = {
        "euler": "EulerDiscreteScheduler",
        "euler_a": "EulerAncestralDiscreteScheduler",
        "heun": "HeunDiscreteScheduler",
        "ddim": "DDIMScheduler",
        "dpmpp_2m": "DPMSolverMultistepScheduler",
        "dpmpp_2m_karras": "DPMSolverMultistepScheduler",
        "dpmpp_2m_sde": "DPMSolverMultistepScheduler",
        "dpmpp_sde": "DPMSolverSDEScheduler",
        "unipc": "UniPCMultistepScheduler",
        "lcm": "LCMScheduler",
    }
    for name in tiny.schedulers:
        scheduler = tiny.make_scheduler(name)
        assert type(scheduler).__name__ == expected[name]
        config = scheduler.config
        # The model's training schedule survives the class change.
        assert (config.beta_start, config.beta_end) == pytest.approx((0.00085, 0.012))
        assert config.beta_schedule == "scaled_linear"
        assert config.prediction_type == "epsilon"
    assert tiny.make_scheduler("dpmpp_2m_karras").config.use_karras_sigmas is True
    assert tiny.make_scheduler("dpmpp_2m").config.use_karras_sigmas is False
    assert tiny.make_scheduler("dpmpp_2m").config.algorithm_type == "dpmsolver++"
    assert tiny.make_scheduler("dpmpp_2m_sde").config.algorithm_type == "sde-dpmsolver++"
    assert tiny.make_scheduler("ddim").config.clip_sample is False


def _scheduler_settings(scheduler: Any) -> dict[str, Any]:
    """A scheduler's config, less diffusers' bookkeeping of which values were defaults."""
    config = dict(scheduler.config)
    defaults = config.pop("_use_default_values", [])
    return {**config, "_use_default_values": sorted(defaults)}


def test_scheduler_config_is_captured_at_load_and_read_only(tiny_cache: Path) -> None:
    model = load_model("tiny", device="cpu", cache_dir=tiny_cache)
    assert dict(model.scheduler_config) == dict(model.pipeline.scheduler.config)
    with pytest.raises(TypeError):
        model.scheduler_config["use_karras_sigmas"] = True  # type: ignore[index]


def test_make_scheduler_ignores_the_scheduler_a_previous_job_left(tiny: LoadedModel) -> None:
    """Every job's scheduler comes from the load-time config, not the last job's.

    Before the config was captured at load, make_scheduler built from whatever the
    previous job had put on the pipeline: after dpmpp_2m_karras, euler_a's and ddim's
    configs carried use_karras_sigmas=True; after ddim, lcm's set_alpha_to_one was
    False instead of True; algorithm_type/solver_order/clip_sample rode along too.
    """
    fresh = {name: _scheduler_settings(tiny.make_scheduler(name)) for name in tiny.schedulers}
    for previous in tiny.schedulers:
        with _scheduler_on(tiny.pipeline, tiny.make_scheduler(previous)):
            for name in tiny.schedulers:
                after = _scheduler_settings(tiny.make_scheduler(name))
                assert after == fresh[name], f"{previous} -> {name}"
    assert not fresh["euler_a"].get("use_karras_sigmas")
    assert fresh["lcm"]["set_alpha_to_one"] is True


def test_make_scheduler_unknown_name(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="dpm-bogus"):
        tiny.make_scheduler("dpm-bogus")


# What set_timesteps(3) gives each scheduler: the pipelines loop over every timestep.
_LOOP_ITERATIONS_FOR_3_STEPS = {"heun": 5}


@pytest.mark.parametrize("name", available_schedulers())
def test_every_scheduler_generates_deterministically(tiny: LoadedModel, name: str) -> None:
    probe = tiny.make_scheduler(name)
    probe.set_timesteps(3)
    iterations = len(probe.timesteps)
    assert iterations == _LOOP_ITERATIONS_FOR_3_STEPS.get(name, 3)

    def run() -> tuple[np.ndarray, int]:
        calls: list[int] = []

        def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict:
            calls.append(index)
            return {}

        with _scheduler_on(tiny.pipeline, tiny.make_scheduler(name)):
            image = _generate(tiny, steps=3, callback_on_step_end=on_step_end)
        assert calls == list(range(len(calls)))
        return image, len(calls)

    (first, count), (second, _) = run(), run()
    assert count == iterations
    assert np.isfinite(first).all()
    assert np.array_equal(first, second)


# ------------------------------------------------------------------------------ LoRAs


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


# ---------------------------------------------------------------------- preview decoder


@pytest.fixture(scope="module")
def taesd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_taesd(tmp_path_factory.mktemp("taesd") / "taesd")


def test_preview_decoder(tiny_cache: Path, taesd_dir: Path) -> None:
    from diffusers import AutoencoderTiny

    model = load_model("tiny", device="cpu", cache_dir=tiny_cache, preview_decoder=taesd_dir)
    decoder = model.preview_decoder
    assert isinstance(decoder, AutoencoderTiny)
    assert decoder.dtype == model.dtype
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    rgb = model.decode_preview(latent)
    assert rgb.dtype == np.uint8
    assert rgb.shape == (64, 64, 3)
    assert np.array_equal(rgb, model.decode_preview(latent))
    assert np.array_equal(rgb, model.decode_preview(latent[0]))
    # TAESD decodes the sampler's (scaled) latents as they are: scaling_factor 1.0.
    with torch.no_grad():
        direct = decoder.decode(latent).sample[0]
    expected = ((direct.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    assert np.array_equal(rgb, expected.numpy())


def test_decode_preview_without_decoder(tiny: LoadedModel) -> None:
    with pytest.raises(RuntimeError, match="no preview decoder"):
        tiny.decode_preview(torch.zeros(1, 4, 8, 8))


def test_preview_decoder_errors(tiny_cache: Path, tmp_path: Path) -> None:
    wrong = build_tiny_taesd(tmp_path / "taesd16", latent_channels=16)
    with pytest.raises(ModelLoadError, match="16-channel latents") as info:
        load_model("tiny", device="cpu", cache_dir=tiny_cache, preview_decoder=wrong)
    assert "4 latent channels" in str(info.value)
    with pytest.raises(ModelLoadError, match="preview decoder"):
        load_model("tiny", device="cpu", cache_dir=tiny_cache, preview_decoder=tmp_path / "no")


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


def test_resolve_device_cuda_index_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match=r"only 2 CUDA device\(s\)"):
        resolve_device("cuda:2")


@pytest.mark.parametrize("spec", ["gpu0", "", "cuda:x", "meta"])
def test_resolve_device_invalid(spec: str) -> None:
    with pytest.raises(ValueError, match=re.escape(repr(spec))):
        resolve_device(spec)


def test_default_dtype() -> None:
    assert default_dtype(torch.device("cpu")) == torch.float32
    assert default_dtype(torch.device("cuda")) == torch.float16
    assert default_dtype(torch.device("mps")) == torch.float16


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
