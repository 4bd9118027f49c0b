"""Unit tests for latentcast.server.engine.prompts: the prompt-embedding cache.

Jobs go through a real :class:`EngineCore` on the test's thread and are compared with the
diffusers pipeline called directly with the text prompt. Where only the cache matters, a
job is added (its prompt is encoded in :meth:`EngineCore.add`) and aborted unstepped.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from latentcast.server.engine import (
    PROMPT_CACHE_SIZE,
    EngineCore,
    JobSpec,
    JobStarted,
    PromptCache,
    uses_guidance,
)
from latentcast.server.jobs import GenerationRequest
from latentcast.server.models import LoadedModel

from .support import MODES, direct, make_request, run


@pytest.fixture(scope="module", params=["tiny", "tiny-sdxl"])
def model(request: pytest.FixtureRequest) -> LoadedModel:
    return request.getfixturevalue(request.param.replace("-", "_"))


#: One denoising step is enough to see the embeddings: img2img and inpaint run
#: int(2 * 0.5) = 1 step.
ONE_STEP = {
    "txt2img": {"steps": 1},
    "img2img": {**MODES["img2img"], "steps": 2, "strength": 0.5},
    "inpaint": {**MODES["inpaint"], "steps": 2, "strength": 0.5},
}


def _images(core: EngineCore, request: GenerationRequest) -> list[np.ndarray]:
    return run(core, {"job": request}).images("job")


def _encode(core: EngineCore, request: GenerationRequest) -> JobStarted:
    """Add ``request`` (which encodes its prompt, or finds it cached) and take it out."""
    (started,) = core.add(JobSpec("probe", request))
    assert isinstance(started, JobStarted), started
    core.abort("probe")
    assert not core.busy
    return started


def _counts(core: EngineCore) -> tuple[int, int]:
    return core.prompts.misses, core.prompts.hits


@contextmanager
def _counting_text_encoders(model: LoadedModel) -> Iterator[list[str]]:
    """Record every text encoder forward (SDXL has two) while the block runs."""
    calls: list[str] = []
    pipeline: Any = model.pipeline
    patched = []
    for name in ("text_encoder", "text_encoder_2"):
        encoder = getattr(pipeline, name, None)
        if encoder is None:
            continue
        original = encoder.forward

        def counted(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any):
            calls.append(_name)
            return _original(*args, **kwargs)

        encoder.forward = counted
        patched.append(encoder)
    try:
        yield calls
    finally:
        for encoder in patched:
            del encoder.forward  # back to the class's method


@pytest.mark.parametrize("mode", list(ONE_STEP))
@pytest.mark.parametrize("guidance", [7.5, 1.0])
def test_cached_embeddings_give_the_text_prompt_bytes(
    model: LoadedModel, mode: str, guidance: float
) -> None:
    core = EngineCore(model, max_batch=8)
    request = make_request(guidance_scale=guidance, num_images=2, **ONE_STEP[mode])
    miss = _images(core, request)
    hit = _images(core, request)
    assert _counts(core) == (1, 1)
    pipeline = direct(model, request)
    assert len(miss) == len(hit) == len(pipeline) == 2
    for a, b, c in zip(miss, hit, pipeline, strict=True):
        assert np.array_equal(a, b)
        assert np.array_equal(a, c)
    # The two images are two images (seed and seed + 1), not one twice.
    assert not np.array_equal(miss[0], miss[1])


def test_the_text_encoders_run_once_for_identical_submits(model: LoadedModel) -> None:
    core = EngineCore(model, max_batch=8)
    request = make_request()
    with _counting_text_encoders(model) as calls:
        for _ in range(5):
            _encode(core, request)
    encoders = 2 if getattr(model.pipeline, "text_encoder_2", None) is not None else 1
    # One miss: prompt and negative prompt, through each text encoder.
    assert len(calls) == 2 * encoders
    assert _counts(core) == (1, 4)


def test_jobs_added_together_share_one_encoding(model: LoadedModel) -> None:
    core = EngineCore(model, max_batch=8)
    for key in range(3):
        core.add(JobSpec(key, make_request(seed=key)))
    assert _counts(core) == (1, 2)
    for key in range(3):
        core.abort(key)


def test_modes_share_the_cache(model: LoadedModel) -> None:
    core = EngineCore(model, max_batch=8)
    for mode in MODES:
        _encode(core, make_request(**MODES[mode]))
    assert _counts(core) == (1, 2)


def test_what_changes_the_embeddings_misses(model: LoadedModel) -> None:
    core = EngineCore(model, max_batch=8)
    base = make_request()
    for request in (
        base,
        replace(base, prompt="a blue fox"),
        replace(base, negative_prompt="sharp"),
        replace(base, guidance_scale=1.0),
    ):
        _encode(core, request)
    assert _counts(core) == (4, 0)
    # What does not change them hits: seed, size, steps, scheduler, images, mode,
    # strength, guidance above 1; and any scale that turns guidance off is like 1.0.
    for request in (
        replace(base, seed=9, width=72, steps=3, scheduler="ddim", guidance_scale=5.0),
        replace(base, num_images=3),
        make_request(**{**MODES["img2img"], "strength": 0.3}),
        replace(base, guidance_scale=0.5),
    ):
        _encode(core, request)
    assert _counts(core) == (4, 4)
    assert len(core.prompts) == 4


def test_guidance_is_the_pipelines_rule(model: LoadedModel) -> None:
    pipeline: Any = model.pipeline
    assert pipeline.unet.config.time_cond_proj_dim is None
    assert uses_guidance(pipeline, 7.5)
    assert uses_guidance(pipeline, 1.01)
    assert not uses_guidance(pipeline, 1.0)
    assert not uses_guidance(pipeline, 0.0)
    key = PromptCache.key(model, pipeline, make_request(guidance_scale=1.0))
    assert key.guidance is False
    assert key.model == model.name


def test_a_lora_selection_is_part_of_the_key(tiny_lora: LoadedModel) -> None:
    core = EngineCore(tiny_lora, max_batch=8)
    selections = [(), (("a", 1.0),), (("a", 0.5),), (("a", 1.0), ("b", 1.0))]
    images = []
    for loras in selections:
        request = make_request(loras=loras, steps=1)
        (image,) = _images(core, request)
        assert np.array_equal(image, direct(tiny_lora, request)[0]), loras
        images.append(image)
    assert _counts(core) == (4, 0)
    # The LoRAs change the images (else the comparison above would prove little).
    assert not np.array_equal(images[0], images[1])
    assert not np.array_equal(images[1], images[2])
    _encode(core, make_request(loras=(("a", 0.5),)))
    assert _counts(core) == (4, 1)
    # A scale written as an int is the same selection.
    _encode(core, make_request(loras=(("a", 1),)))
    assert _counts(core) == (4, 2)


def test_the_cache_is_bounded_least_recently_used_first_out(model: LoadedModel) -> None:
    assert PromptCache().size == PROMPT_CACHE_SIZE
    cache = PromptCache(size=2)
    pipeline = model.pipeline
    first, second, third = (make_request(prompt=p) for p in ("one", "two", "three"))
    cache.embeddings(model, pipeline, first)
    cache.embeddings(model, pipeline, second)
    cache.embeddings(model, pipeline, first)  # now "two" is the least recently used
    cache.embeddings(model, pipeline, third)
    assert len(cache) == 2
    cache.embeddings(model, pipeline, first)
    assert (cache.misses, cache.hits) == (3, 2)
    cache.embeddings(model, pipeline, second)
    assert (cache.misses, cache.hits) == (4, 2)
    cache.clear()
    assert len(cache) == 0


def test_a_hit_gives_the_cached_tensors_and_its_own_dict(model: LoadedModel) -> None:
    cache = PromptCache()
    pipeline = model.pipeline
    request = make_request()
    first = cache.embeddings(model, pipeline, request)
    names = {"prompt_embeds", "negative_prompt_embeds"}
    if model.family.name == "sdxl":
        names |= {"pooled_prompt_embeds", "negative_pooled_prompt_embeds"}
    assert set(first) == names
    # One image's worth: the engine repeats them per image.
    assert first["prompt_embeds"].shape[0] == 1
    first.clear()  # a caller's changes to its dict do not reach the cache
    second = cache.embeddings(model, pipeline, request)
    assert set(second) == names
    assert (cache.misses, cache.hits) == (1, 1)


def test_prompt_warnings_still_come_with_a_cached_prompt(model: LoadedModel) -> None:
    core = EngineCore(model, max_batch=8)
    request = make_request(prompt="a photo of a cat " * 40)
    for _ in range(2):
        started = _encode(core, request)
        assert started.warnings and "prompt is" in started.warnings[0]
    assert _counts(core) == (1, 1)
    assert _encode(core, make_request()).warnings == []
