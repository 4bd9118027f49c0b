"""Unit tests for latentcast.server.engine.batching: admission rules and group keys.

BatchPolicy is pure; group_key reads the model's VAE scale factor (a real tiny model).
"""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace

import pytest
from PIL import Image

from latentcast.server.engine import (
    BatchPolicy,
    EngineCore,
    GroupKey,
    JobSpec,
    default_max_batch,
    group_key,
)
from latentcast.server.engine.batching import MAX_GROUPS
from latentcast.server.jobs import JobControl
from latentcast.server.models import LoadedModel

from .support import MODES, make_request

SMALL = GroupKey(8, 8, ())
LARGE = GroupKey(16, 16, ())
STYLED = GroupKey(8, 8, (("style", 1.0),))
OTHERS = [GroupKey(8 * k, 8, ()) for k in range(2, 10)]


# ---------------------------------------------------------------------- BatchPolicy


def test_an_empty_engine_admits_any_job_even_one_bigger_than_a_batch() -> None:
    policy = BatchPolicy(4)
    assert policy.admits({}, SMALL, 1)
    assert policy.admits({}, SMALL, 4)
    assert policy.admits({}, SMALL, 9)
    assert BatchPolicy(1).admits({}, SMALL, 2)


def test_a_job_joins_its_group_while_the_group_has_room() -> None:
    policy = BatchPolicy(4)
    assert policy.admits({SMALL: 2}, SMALL, 2)  # exactly full
    assert not policy.admits({SMALL: 2}, SMALL, 3)
    assert not policy.admits({SMALL: 4}, SMALL, 1)
    # The room of its own group counts, not the others'.
    assert policy.admits({SMALL: 1, LARGE: 4}, SMALL, 3)
    assert not policy.admits({SMALL: 4, LARGE: 0}, SMALL, 1)


def test_a_job_bigger_than_a_batch_runs_alone() -> None:
    policy = BatchPolicy(4)
    assert not policy.admits({SMALL: 6}, SMALL, 1)  # its group is over the limit
    assert not policy.admits({SMALL: 1}, SMALL, 6)


def test_a_job_opens_a_new_group_while_there_are_fewer_than_max_groups() -> None:
    policy = BatchPolicy(8)
    assert policy.max_groups == MAX_GROUPS == 4
    groups = {SMALL: 8}
    for key in OTHERS[:3]:
        assert policy.admits(groups, key, 8), len(groups)
        groups[key] = 8
    assert len(groups) == 4
    assert not policy.admits(groups, LARGE, 1)
    # A full engine still takes a job into a group with room.
    groups[SMALL] = 2
    assert policy.admits(groups, SMALL, 6)
    assert not policy.admits(groups, SMALL, 7)


def test_a_new_group_does_not_need_room_in_the_others() -> None:
    policy = BatchPolicy(2, max_groups=2)
    assert policy.admits({SMALL: 2}, LARGE, 2)
    assert policy.admits({SMALL: 2}, STYLED, 1)  # another LoRA selection: another group
    assert not policy.admits({SMALL: 2, LARGE: 2}, STYLED, 1)


def test_max_batch_one_runs_one_job_at_a_time() -> None:
    policy = BatchPolicy(1)
    assert policy.max_groups == 1
    assert BatchPolicy(1, max_groups=4).max_groups == 1
    # Whatever runs (a guided job holds two rows), nothing else joins.
    for held in (1, 2):
        assert not policy.admits({SMALL: held}, SMALL, 1)
        assert not policy.admits({SMALL: held}, LARGE, 1)
    assert BatchPolicy(2).max_groups == MAX_GROUPS


@pytest.mark.parametrize("max_batch", [0, -1])
def test_max_batch_must_be_positive(max_batch: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        BatchPolicy(max_batch)


def test_the_default_max_batch_by_device_type() -> None:
    assert default_max_batch("cpu") == 8
    assert default_max_batch("cuda") == 16
    assert default_max_batch("mps") == 4
    assert default_max_batch("xpu") == 4


def test_a_policy_and_a_key_are_values() -> None:
    assert BatchPolicy(4) == BatchPolicy(4)
    with pytest.raises(FrozenInstanceError):
        BatchPolicy(4).max_batch = 5  # type: ignore[misc]
    assert GroupKey(8, 8, ()) == SMALL and hash(GroupKey(8, 8, ())) == hash(SMALL)
    assert len({SMALL, LARGE, STYLED, GroupKey(8, 8, ())}) == 3


# ---------------------------------------------------------------------- group_key


def test_the_key_is_the_latent_size_and_the_lora_selection(tiny: LoadedModel) -> None:
    assert tiny.vae_scale_factor == 8
    base = make_request(width=64, height=96)
    key = group_key(tiny, base)
    assert key == GroupKey(latent_height=12, latent_width=8, loras=())
    assert group_key(tiny, replace(base, width=96, height=64)) == GroupKey(8, 12, ())
    styled = replace(base, loras=(("a", 1), ("b", 0.5)))
    assert group_key(tiny, styled) == GroupKey(12, 8, (("a", 1.0), ("b", 0.5)))
    assert group_key(tiny, styled).loras[0][1].__class__ is float
    assert group_key(tiny, replace(base, loras=(("a", 0.5),))) != group_key(
        tiny, replace(base, loras=(("a", 1.0),))
    )
    # A JobSpec has its request's key.
    assert group_key(tiny, JobSpec("k", styled)) == group_key(tiny, styled)


def test_the_key_has_the_sorted_controlnet_selection_not_the_scales(tiny: LoadedModel) -> None:
    base = make_request(width=64, height=64)
    image = Image.new("RGB", (64, 64))
    controlled = replace(
        base, controls=(JobControl("scribble", image, scale=0.5), JobControl("canny", image))
    )
    key = group_key(tiny, controlled)
    assert key.controlnets == ("canny", "scribble")
    assert key != group_key(tiny, base) and group_key(tiny, base).controlnets == ()
    # Scale, window and image are per job: they do not split groups.
    other = replace(
        base,
        controls=(
            JobControl("canny", Image.new("RGB", (64, 64), "white"), start=0.5),
            JobControl("scribble", image, scale=2.0),
        ),
    )
    assert group_key(tiny, other) == key
    # The same ControlNet twice is called twice: another selection.
    twice = replace(base, controls=(JobControl("canny", image), JobControl("canny", image)))
    assert group_key(tiny, twice).controlnets == ("canny", "canny")


def test_what_a_row_carries_does_not_change_the_key(tiny: LoadedModel) -> None:
    base = make_request()
    key = group_key(tiny, base)
    for request in (
        replace(base, prompt="another", negative_prompt="", seed=99),
        replace(base, scheduler="heun", steps=9, guidance_scale=1.0, num_images=3),
        make_request(**MODES["img2img"]),
        make_request(**{**MODES["inpaint"], "strength": 0.3}),
    ):
        assert group_key(tiny, request) == key


def test_the_core_groups_jobs_by_their_key(tiny: LoadedModel) -> None:
    """Jobs of one key share a step, another key steps on its own turn."""
    core = EngineCore(tiny, max_batch=8)
    core.add(JobSpec("a", make_request(seed=1)))
    core.add(JobSpec("b", make_request(seed=2, **MODES["img2img"])))
    core.add(JobSpec("c", make_request(seed=3, width=72)))
    first, second = core.step(), core.step()
    assert first.unet_rows == [4] and {e.key for e in first.events} == {"a", "b"}
    assert second.unet_rows == [2] and {e.key for e in second.events} == {"c"}
    for key in "abc":
        core.abort(key)
    assert not core.busy
