"""Unit tests for latentcast.server.engine: the prompt-embedding cache, in-process.

Jobs run through :meth:`Engine.generate` on the test's thread and are compared with a
direct text-prompt pipeline call (:meth:`Engine.pipeline_arguments`) on the same thread.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from latentcast.server.engine import Engine, LatentSnapshot, PromptCache
from latentcast.server.jobs import GenerationRequest
from latentcast.server.models import LoadedModel, load_model
from tests.fixtures.loras import build_tiny_lora


class _Quiet:
    """A StepListener that only keeps the warnings."""

    warnings: list[str] | None = None

    def started(self, steps: int, warnings: list[str]) -> None:
        self.warnings = warnings

    def step(self, step: int, steps: int, latent: LatentSnapshot | None) -> None:
        pass


@pytest.fixture(scope="module", params=["tiny", "tiny-sdxl"])
def model(request: pytest.FixtureRequest, model_cache: Path) -> LoadedModel:
    return load_model(request.param, device="cpu", cache_dir=model_cache)


@pytest.fixture(scope="module")
def tiny_lora(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    root = tmp_path_factory.mktemp("loras")
    loras = {"a": build_tiny_lora(root / "a", seed=1), "b": build_tiny_lora(root / "b", seed=2)}
    return load_model("tiny", device="cpu", cache_dir=model_cache, loras=loras)


def _request(**fields: Any) -> GenerationRequest:
    base: dict[str, Any] = {
        "prompt": "a red fox",
        "negative_prompt": "blurry",
        "width": 64,
        "height": 64,
        "steps": 2,
        "guidance_scale": 7.5,
        "seed": 3,
        "scheduler": "euler",
        "num_images": 1,
    }
    base.update(fields)
    return GenerationRequest(**base)


def _noise(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _mask() -> Image.Image:
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    return Image.fromarray(mask)


def _run(engine: Engine, request: GenerationRequest) -> list[np.ndarray]:
    return [np.asarray(image) for image in engine.generate(request, _Quiet(), threading.Event())]


def _direct(engine: Engine, request: GenerationRequest) -> list[np.ndarray]:
    """The same job from the text prompt, calling the pipeline directly."""
    model = engine.model
    model.activate_loras(request.loras)
    pipeline: Any = model.pipeline_for(request.mode)
    pipeline.scheduler = model.make_scheduler(request.scheduler)
    images = pipeline(**engine.pipeline_arguments(request)).images
    if request.mode == "inpaint":
        from latentcast.server.images import composite

        assert request.init_image is not None and request.mask is not None
        images = [composite(image, request.init_image, request.mask) for image in images]
    return [np.asarray(image) for image in images]


@contextmanager
def _counting_text_encoders(model: LoadedModel) -> Iterator[list[str]]:
    """Record every text encoder forward (SDXL has two) while the block runs."""
    calls: list[str] = []
    pipeline: Any = model.pipeline
    encoders = [
        (name, getattr(pipeline, name, None)) for name in ("text_encoder", "text_encoder_2")
    ]
    patched = []
    for name, encoder in encoders:
        if encoder is None:
            continue
        original = encoder.forward

        def counted(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any):
            calls.append(_name)
            return _original(*args, **kwargs)

        encoder.forward = counted
        patched.append((encoder, original))
    try:
        yield calls
    finally:
        for encoder, _ in patched:
            del encoder.forward  # back to the class's method


_MODES = {
    "txt2img": {},
    "img2img": {"mode": "img2img", "init_image": _noise(1), "strength": 0.6, "steps": 3},
    "inpaint": {"mode": "inpaint", "init_image": _noise(2), "mask": _mask(), "steps": 3},
}


@pytest.mark.parametrize("mode", list(_MODES))
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_cached_embeddings_give_the_text_prompt_bytes(
    model: LoadedModel, mode: str, guidance: float
) -> None:
    engine = Engine(model)
    request = _request(guidance_scale=guidance, num_images=2, **_MODES[mode])
    miss = _run(engine, request)
    hit = _run(engine, request)
    assert (engine.prompts.misses, engine.prompts.hits) == (1, 1)
    direct = _direct(engine, request)
    assert len(miss) == len(hit) == len(direct) == 2
    for a, b, c in zip(miss, hit, direct, strict=True):
        assert np.array_equal(a, b)
        assert np.array_equal(a, c)


def test_the_text_encoders_run_once_for_identical_submits(model: LoadedModel) -> None:
    engine = Engine(model)
    request = _request()
    with _counting_text_encoders(model) as calls:
        for _ in range(5):
            _run(engine, request)
    encoders = 2 if getattr(model.pipeline, "text_encoder_2", None) is not None else 1
    # One miss: prompt and negative prompt, through each text encoder.
    assert len(calls) == 2 * encoders
    assert (engine.prompts.misses, engine.prompts.hits) == (1, 4)


def test_modes_share_the_cache(model: LoadedModel) -> None:
    engine = Engine(model)
    for mode in _MODES:
        _run(engine, _request(**_MODES[mode]))
    assert (engine.prompts.misses, engine.prompts.hits) == (1, 2)


def test_what_changes_the_embeddings_misses(model: LoadedModel) -> None:
    engine = Engine(model)
    base = _request()
    variants = [
        base,
        replace(base, prompt="a blue fox"),
        replace(base, negative_prompt="sharp"),
        replace(base, guidance_scale=1.0),
    ]
    for request in variants:
        _run(engine, request)
    assert (engine.prompts.misses, engine.prompts.hits) == (4, 0)
    # What does not change them hits: seed, size, steps, scheduler, guidance above 1.
    for request in (
        replace(base, seed=9, width=72, steps=3, scheduler="ddim", guidance_scale=5.0),
        replace(base, guidance_scale=0.5),  # no guidance, like 1.0
    ):
        _run(engine, request)
    assert (engine.prompts.misses, engine.prompts.hits) == (4, 2)


def test_a_lora_selection_is_part_of_the_key(tiny_lora: LoadedModel) -> None:
    engine = Engine(tiny_lora)
    selections = [(), (("a", 1.0),), (("a", 0.5),), (("a", 1.0), ("b", 1.0))]
    for loras in selections:
        request = _request(loras=loras)
        assert np.array_equal(_run(engine, request)[0], _direct(engine, request)[0])
    assert (engine.prompts.misses, engine.prompts.hits) == (4, 0)
    _run(engine, _request(loras=(("a", 0.5),)))
    assert (engine.prompts.misses, engine.prompts.hits) == (4, 1)


def test_the_cache_is_bounded_least_recently_used_first_out(model: LoadedModel) -> None:
    cache = PromptCache(size=2)
    pipeline = model.pipeline
    first, second, third = (_request(prompt=p) for p in ("one", "two", "three"))
    cache.arguments(model, pipeline, first)
    cache.arguments(model, pipeline, second)
    cache.arguments(model, pipeline, first)  # now "two" is the least recently used
    cache.arguments(model, pipeline, third)
    assert len(cache) == 2
    cache.arguments(model, pipeline, first)
    assert (cache.misses, cache.hits) == (3, 2)
    cache.arguments(model, pipeline, second)
    assert (cache.misses, cache.hits) == (4, 2)
    cache.clear()
    assert len(cache) == 0


def test_prompt_warnings_still_come_with_a_cached_prompt(model: LoadedModel) -> None:
    engine = Engine(model)
    request = _request(prompt="a photo of a cat " * 40)
    for _ in range(2):
        listener = _Quiet()
        engine.generate(request, listener, threading.Event())
        assert listener.warnings and "prompt is" in listener.warnings[0]
    assert engine.prompts.hits == 1
