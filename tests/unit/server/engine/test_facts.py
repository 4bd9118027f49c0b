"""Unit tests for latentcast.server.engine.facts: the model as the front end sees it.

The facts are read from real tiny models and must agree with the engine's own rules
(rows per job, group keys), and survive a pickle round trip (they cross to a Ray
front end from an engine in another process).
"""

from __future__ import annotations

import pickle
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from latentcast.server.engine import JobSpec, ModelFacts, group_key
from latentcast.server.engine.prepare import job_rows
from latentcast.server.jobs import JobControl
from latentcast.server.models import LoadedModel, load_model
from tests.fixtures.controlnets import build_tiny_controlnet

from .support import MODES, make_request


def test_the_facts_are_the_models(tiny: LoadedModel, tiny_sdxl: LoadedModel) -> None:
    for model in (tiny, tiny_sdxl):
        facts = ModelFacts.of(model)
        assert facts.name == model.name
        assert facts.family == model.family.name
        assert facts.device == "cpu" and facts.dtype == "float32"
        assert facts.modes == model.modes and facts.schedulers == model.schedulers
        assert facts.default_scheduler == model.default_scheduler
        assert facts.latent_channels == model.latent_channels
        assert facts.vae_scale_factor == model.vae_scale_factor
        assert facts.default_size == model.default_size
        assert facts.latent_rgb == model.family.latent_rgb
        assert facts.image_previews and not facts.preview_decoder
        assert not facts.guidance_embedded
        # lcm refuses more steps than it distils; the others have no limit.
        assert dict(facts.step_limits) == {"lcm": 50}
        assert facts.controlnets == model.controlnets == ()


def test_the_facts_name_the_controlnets_and_a_controlled_request_pickles(
    model_cache: Path, tmp_path: Path
) -> None:
    folder = build_tiny_controlnet(tmp_path / "controlnet")
    model = load_model("tiny", device="cpu", cache_dir=model_cache, controlnets={"s": folder})
    facts = ModelFacts.of(model)
    assert facts.controlnets == ("s",)
    assert pickle.loads(pickle.dumps(facts)) == facts
    # A spec with controls crosses to a Ray engine: the request, images included.
    request = make_request(controls=(JobControl("s", Image.new("RGB", (64, 64)), scale=0.5),))
    spec = pickle.loads(pickle.dumps(JobSpec("k", request)))
    (control,) = spec.request.controls
    assert (control.name, control.scale, control.image.size) == ("s", 0.5, (64, 64))
    assert facts.group_key(spec) == group_key(model, request)
    assert facts.group_key(spec).controlnets == ("s",)


def test_rows_and_groups_follow_the_engines_rules(tiny: LoadedModel) -> None:
    facts = ModelFacts.of(tiny)
    base = make_request(width=64, height=96)
    for request in (
        base,
        replace(base, guidance_scale=1.0),
        replace(base, num_images=3),
        replace(base, num_images=2, guidance_scale=1.0, loras=(("a", 0.5),)),
        make_request(**MODES["img2img"]),
    ):
        assert facts.job_rows(request) == job_rows(tiny, request)
        assert facts.group_key(request) == group_key(tiny, request)
    assert facts.job_rows(base) == 2 and facts.job_rows(replace(base, num_images=3)) == 6


def test_a_unet_that_takes_the_guidance_scale_needs_no_second_row(tiny: LoadedModel) -> None:
    facts = replace(ModelFacts.of(tiny), guidance_embedded=True)
    assert not facts.uses_guidance(7.5)
    assert facts.job_rows(make_request(guidance_scale=7.5, num_images=2)) == 2


def test_the_facts_pickle_and_stay_read_only(tiny: LoadedModel) -> None:
    facts = ModelFacts.of(tiny)
    copy = pickle.loads(pickle.dumps(facts))
    assert copy == facts
    with pytest.raises(TypeError):
        copy.step_limits["euler"] = 1  # type: ignore[index]
