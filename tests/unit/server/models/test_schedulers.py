"""Unit tests for latentcast.server.models.schedulers: the scheduler list and the
per-job schedulers LoadedModel.make_scheduler builds."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from latentcast.server.models import LoadedModel, available_schedulers, load_model
from tests.unit.server.models.support import _generate


@contextmanager
def _scheduler_on(pipeline: Any, scheduler: Any) -> Iterator[None]:
    """Run with ``scheduler`` on a shared pipeline, restoring the old one after."""
    original = pipeline.scheduler
    pipeline.scheduler = scheduler
    try:
        yield
    finally:
        pipeline.scheduler = original


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
