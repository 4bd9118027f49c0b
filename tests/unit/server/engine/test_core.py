"""Unit tests for latentcast.server.engine.core: EngineCore, stepped on the test's thread.

Real tiny models throughout; faults are injected by wrapping the real UNet's forward
(or VAE decode, or a scheduler's step) so that it raises for some calls.

* Alone, a job gives the bytes of the diffusers pipeline called directly: every model,
  mode and scheduler, plus two images and guidance off.
* Together (one group, one UNet call per step) the same jobs give their lone images up
  to rounding (tests.support.BATCH_ROUNDING).
* Aborts, groups taking turns, jobs joining a running group, failure containment, step
  counts and previews, bad requests.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import pytest
import torch

from latentcast.protocol import PreviewRequest
from latentcast.server.engine import (
    EngineCore,
    JobFailed,
    JobFinished,
    JobSpec,
    JobStarted,
    JobStepped,
    JobStopped,
    diffusers_arguments,
)
from latentcast.server.jobs import GenerationRequest
from latentcast.server.models import LoadedModel, load_model
from latentcast.server.previews import latent_to_fp16_bytes
from tests.fixtures.taesd import build_tiny_taesd
from tests.support import BATCH_ROUNDING

from .support import (
    MODES,
    Run,
    alone,
    direct,
    failing_unet,
    largest_difference,
    make_request,
    run,
)

MODELS = ["tiny", "tiny-sdxl", "tiny-inpaint"]


def _rows(request: GenerationRequest) -> int:
    """UNet rows of a job on the tiny models: one per image, two with guidance."""
    return request.num_images * (2 if request.guidance_scale > 1 else 1)


def _model(fixtures: pytest.FixtureRequest, name: str) -> LoadedModel:
    return fixtures.getfixturevalue(name.replace("-", "_"))


#: img2img and inpaint with every scheduler: int(2 * 0.5) = 1 step of a 2-step schedule
#: (the scheduler's part is where it starts: timesteps, begin index, the noised init).
ONE_STEP = {"steps": 2, "strength": 0.5}


def cases(model: LoadedModel) -> dict[str, GenerationRequest]:
    """Every mode of ``model`` with every scheduler, plus two images (stochastic
    euler_a, four rows) and guidance off (stochastic multistep dpmpp_2m_sde) per mode.

    txt2img runs 2 steps (heun 3); img2img and inpaint 1 step with every scheduler and
    2 steps (MODES) in the other two cases, so that inpainting blends the noised known
    region between steps. Each job has its own prompt, seed and guidance scale, so that
    rows mixed up in a batch show."""
    requests: dict[str, GenerationRequest] = {}
    for mode in model.modes:
        sweep = {} if mode == "txt2img" else ONE_STEP
        variants = {scheduler: {"scheduler": scheduler, **sweep} for scheduler in model.schedulers}
        variants["num_images=2"] = {"scheduler": "euler_a", "num_images": 2}
        variants["guidance=1"] = {"scheduler": "dpmpp_2m_sde", "guidance_scale": 1.0}
        for name, fields in variants.items():
            k = len(requests)
            requests[f"{mode}/{name}"] = make_request(
                prompt=f"a red fox, number {k}",
                seed=100 + k,
                **{"guidance_scale": 3.0 + k % 6, **MODES[mode], **fields},
            )
    return requests


@pytest.fixture(scope="module")
def lone_runs() -> dict[str, dict[str, Run]]:
    """Each case of each model run alone in a fresh core, filled on first use."""
    return {}


def _lone(lone_runs: dict[str, dict[str, Run]], model: LoadedModel) -> dict[str, Run]:
    if model.name not in lone_runs:
        lone_runs[model.name] = {
            case: run(EngineCore(model, max_batch=8), {case: request})
            for case, request in cases(model).items()
        }
    return lone_runs[model.name]


# ---------------------------------------------------------------------- 1. alone


@pytest.mark.parametrize("model_name", MODELS)
def test_a_job_alone_gives_the_pipeline_bytes(
    request: pytest.FixtureRequest, lone_runs: dict[str, dict[str, Run]], model_name: str
) -> None:
    model = _model(request, model_name)
    requests = cases(model)
    assert len(requests) == len(model.modes) * (len(model.schedulers) + 2)
    mismatched = []
    for case, lone in _lone(lone_runs, model).items():
        job = requests[case]
        # Alone: one UNet call per step, with exactly this job's rows.
        assert lone.unet_rows == [_rows(job)] * lone.started(case).steps, case
        images = lone.images(case)
        assert len(images) == job.num_images
        assert images[0].shape == (64, 64, 3)
        if job.num_images == 2:  # two images, not one twice
            assert not np.array_equal(images[0], images[1]), case
        if not all(np.array_equal(a, b) for a, b in zip(images, direct(model, job), strict=True)):
            mismatched.append(case)
    assert mismatched == [], "alone, not the pipeline's bytes"


# ---------------------------------------------------------------------- 2. together


@pytest.mark.parametrize("model_name", MODELS)
def test_jobs_stepped_together_give_their_lone_images_up_to_rounding(
    request: pytest.FixtureRequest, lone_runs: dict[str, dict[str, Run]], model_name: str
) -> None:
    model = _model(request, model_name)
    requests = cases(model)
    lone = _lone(lone_runs, model)
    together = run(EngineCore(model, max_batch=1000), requests)

    # One group: every step is one UNet call with the rows of every job still running.
    steps = {case: lone[case].started(case).steps for case in requests}
    assert len(together.reports) == max(steps.values())
    for n, report in enumerate(together.reports, start=1):
        running = [case for case in requests if steps[case] >= n]
        assert report.unet_rows == [sum(_rows(requests[case]) for case in running)]
        assert {e.key for e in report.events if isinstance(e, JobStepped)} == set(running)
    assert together.reports[0].unet_rows[0] > max(_rows(job) for job in requests.values())

    differences = {}
    for case in requests:
        assert together.started(case).steps == steps[case]
        assert [e.step for e in together.stepped(case)] == list(range(1, steps[case] + 1))
        differences[case] = largest_difference(together.images(case), lone[case].images(case))
    assert max(differences.values()) <= BATCH_ROUNDING, differences


@pytest.mark.parametrize(
    "mode",
    [
        "txt2img",
        "img2img",
        pytest.param(
            "inpaint",
            marks=pytest.mark.xfail(
                strict=True,
                reason="diffusers' inpaint pipelines sample the init image's VAE latents "
                "(once, for all images) with the first image's generator before its noise, "
                "so image k > 0 of a job is not the image of a one-image job with seed + k",
            ),
        ),
    ],
)
def test_image_k_of_a_job_is_the_image_of_seed_plus_k(tiny: LoadedModel, mode: str) -> None:
    """What the server reports as each image's seed; docs/protocol-v1.md (num_images):
    "the same picture as a one-image job with that seed, up to rounding" (a job of two
    images has two rows per UNet call)."""
    fields = {**MODES[mode], "guidance_scale": 1.0, "scheduler": "euler_a"}
    pair = alone(tiny, make_request(seed=40, num_images=2, **fields))
    assert largest_difference(pair[:1], pair[1:]) > BATCH_ROUNDING
    for k in range(2):
        single = alone(tiny, make_request(seed=40 + k, **fields))
        assert largest_difference(pair[k : k + 1], single) <= BATCH_ROUNDING, k


# ---------------------------------------------------------------------- 3. aborts

FOUR_STEPS = {
    "a": make_request(steps=4, seed=1, scheduler="euler_a", prompt="job a"),
    "b": make_request(steps=4, seed=2, scheduler="dpmpp_2m", prompt="job b", guidance_scale=5),
    "c": make_request(steps=4, seed=3, scheduler="euler", prompt="job c", num_images=2),
}


def test_an_aborted_job_stops_and_the_others_in_its_group_go_on(tiny: LoadedModel) -> None:
    core = EngineCore(tiny, max_batch=8)
    result = run(core, FOUR_STEPS, before_step=lambda n: ["b"] if n == 2 else [])
    stopped = result.end("b")
    assert stopped == JobStopped("b", 2)
    assert [e.step for e in result.stepped("b")] == [1, 2]
    # The stop comes first in the report of the step it was asked with.
    assert result.reports[2].events[0] == stopped
    # The UNet calls: all three, then the two that go on.
    rows = {key: _rows(job) for key, job in FOUR_STEPS.items()}
    assert result.unet_rows == [sum(rows.values())] * 2 + [rows["a"] + rows["c"]] * 2
    for key in ("a", "c"):
        assert [e.step for e in result.stepped(key)] == [1, 2, 3, 4]
        difference = largest_difference(result.images(key), alone(tiny, FOUR_STEPS[key]))
        assert difference <= BATCH_ROUNDING, (key, difference)
    assert not core.busy


def test_abort_takes_a_job_out_at_once(tiny: LoadedModel) -> None:
    core = EngineCore(tiny, max_batch=8)
    request = make_request(steps=4)
    assert core.add(JobSpec("x", request)) == [JobStarted("x", 4, [])]
    assert "x" in core and len(core) == 1 and core.busy
    assert core.abort("x") == [JobStopped("x", 0)]
    assert "x" not in core and len(core) == 0 and not core.busy
    # Not running (any more): nothing to say.
    assert core.abort("x") == []
    assert core.abort("never") == []
    # An idle core's step does nothing; unknown aborts are ignored.
    report = core.step(["never"])
    assert (report.events, report.unet_rows) == ([], [])
    # The key is free again.
    core.add(JobSpec("x", request))
    core.step()
    assert core.abort("x") == [JobStopped("x", 1)]


def test_a_core_needs_room_for_a_row(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        EngineCore(tiny, max_batch=0)
    assert EngineCore(tiny, max_batch=1).policy.max_groups == 1


def test_a_key_that_is_running_cannot_be_added_again(tiny: LoadedModel) -> None:
    core = EngineCore(tiny, max_batch=8)
    core.add(JobSpec("x", make_request()))
    with pytest.raises(ValueError, match="already running"):
        core.add(JobSpec("x", make_request()))
    assert len(core) == 1
    core.abort("x")


# ---------------------------------------------------------------------- 4. groups


def _stepped_keys(result: Run) -> list[list[Hashable]]:
    """Per step, the keys of the jobs it stepped."""
    return [
        [e.key for e in report.events if isinstance(e, JobStepped)] for report in result.reports
    ]


def test_groups_of_different_sizes_take_turns(tiny: LoadedModel) -> None:
    small = make_request(steps=2, seed=1)
    large = make_request(steps=4, seed=2, width=128, height=128)
    result = run(EngineCore(tiny, max_batch=8), {"small": small, "large": large})
    assert _stepped_keys(result) == [
        ["small"],
        ["large"],
        ["small"],
        ["large"],
        ["large"],
        ["large"],
    ]
    assert result.unet_rows == [2] * 6
    # Each group alone in its UNet calls and decode: the lone bytes.
    assert np.array_equal(result.images("small")[0], alone(tiny, small)[0])
    assert np.array_equal(result.images("large")[0], alone(tiny, large)[0])
    assert result.images("large")[0].shape == (128, 128, 3)


def test_jobs_with_different_lora_selections_are_separate_groups(tiny_lora: LoadedModel) -> None:
    requests = {
        "none": make_request(steps=2, seed=1),
        "a": make_request(steps=2, seed=2, loras=(("a", 1.0),)),
        "a-half": make_request(steps=2, seed=3, loras=(("a", 0.5),)),
        "a-too": make_request(steps=2, seed=4, loras=(("a", 1.0),), prompt="another"),
    }
    result = run(EngineCore(tiny_lora, max_batch=8), requests)
    assert _stepped_keys(result) == [["none"], ["a", "a-too"], ["a-half"]] * 2
    assert result.unet_rows == [2, 4, 2] * 2
    # Groups of one job stepped between other selections: each its lone bytes, so the
    # group's selection was the active one in every call.
    for key in ("none", "a-half"):
        assert np.array_equal(result.images(key)[0], direct(tiny_lora, requests[key])[0]), key
    for key in ("a", "a-too"):
        difference = largest_difference(result.images(key), direct(tiny_lora, requests[key]))
        assert difference <= BATCH_ROUNDING, (key, difference)
    assert not np.array_equal(result.images("none")[0], result.images("a-half")[0])


def test_a_job_joins_its_running_group_at_the_next_step(tiny: LoadedModel) -> None:
    first = make_request(steps=4, seed=1, scheduler="dpmpp_2m")
    second = make_request(steps=2, seed=2, scheduler="euler_a", guidance_scale=1.0)
    core = EngineCore(tiny, max_batch=8)
    core.add(JobSpec("first", first))
    reports = [core.step(), core.step()]
    core.add(JobSpec("second", second))
    reports += [core.step(), core.step()]
    assert not core.busy
    assert [report.unet_rows for report in reports] == [[2], [2], [3], [3]]
    events = [e for report in reports for e in report.events]
    steps = [(e.key, e.step) for e in events if isinstance(e, JobStepped)]
    assert steps == [
        ("first", 1),
        ("first", 2),
        ("first", 3),
        ("second", 1),
        ("first", 4),
        ("second", 2),
    ]
    finished = {e.key: e for e in events if isinstance(e, JobFinished)}
    assert finished.keys() == {"first", "second"}
    for key, job in (("first", first), ("second", second)):
        difference = largest_difference(
            [np.asarray(image) for image in finished[key].images], alone(tiny, job)
        )
        assert difference <= BATCH_ROUNDING, (key, difference)


# ---------------------------------------------------------------------- 5. failures

#: Four guided jobs of two rows each: an 8-row UNet call.
FOUR_JOBS = {
    f"j{k}": make_request(seed=10 + k, prompt=f"job {k}", scheduler=scheduler)
    for k, scheduler in enumerate(("euler", "euler_a", "dpmpp_2m", "ddim"))
}


def test_a_failing_unet_call_of_several_jobs_is_made_again_in_halves(tiny: LoadedModel) -> None:
    with failing_unet(tiny, lambda rows: rows > 2) as calls:
        result = run(EngineCore(tiny, max_batch=8), FOUR_JOBS)
    # Each step: 8 rows fail, then 4 + 4 fail, then each job alone.
    assert calls == [8, 4, 2, 2, 4, 2, 2] * 2
    # Only the calls that worked are reported.
    assert [report.unet_rows for report in result.reports] == [[2, 2, 2, 2]] * 2
    for key, job in FOUR_JOBS.items():
        assert [e.step for e in result.stepped(key)] == [1, 2]
        # Every step alone; only the decode was shared.
        difference = largest_difference(result.images(key), alone(tiny, job))
        assert difference <= BATCH_ROUNDING, (key, difference)


def test_a_job_that_fails_alone_fails_and_the_others_complete(tiny: LoadedModel) -> None:
    doomed = make_request(seed=1, num_images=3, guidance_scale=1.0)  # 3 rows
    fine = make_request(seed=2, guidance_scale=1.0)  # 1 row
    also = make_request(seed=3, guidance_scale=1.0, scheduler="heun")  # 1 row, 3 steps
    core = EngineCore(tiny, max_batch=8)
    with failing_unet(tiny, lambda rows: rows >= 3) as calls:
        result = run(core, {"doomed": doomed, "fine": fine, "also": also})
    # 5 rows fail; the halves: the doomed job alone (fails: it leaves), the two others.
    assert calls[:3] == [5, 3, 2]
    assert calls[3:] == [2, 1]
    failed = result.end("doomed")
    assert isinstance(failed, JobFailed)
    assert "denoising failed" in failed.message and "simulated failure" in failed.message
    assert result.stepped("doomed") == []
    assert result.reports[0].events[0] == failed
    for key, job in (("fine", fine), ("also", also)):
        difference = largest_difference(result.images(key), alone(tiny, job))
        assert difference <= BATCH_ROUNDING, (key, difference)
    # The core goes on.
    assert not core.busy
    assert np.array_equal(run(core, {"next": doomed}).images("next")[0], alone(tiny, doomed)[0])


@contextmanager
def _failing_decode(model: LoadedModel, fails: Callable[[int], bool]) -> Iterator[list[int]]:
    """Make the VAE decode raise for ``latents`` of ``n`` images where ``fails(n)``."""
    vae: Any = model.pipeline.vae
    original = vae.decode
    calls: list[int] = []

    def decode(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        calls.append(int(latents.shape[0]))
        if fails(int(latents.shape[0])):
            raise RuntimeError("simulated decode failure")
        return original(latents, *args, **kwargs)

    vae.decode = decode
    try:
        yield calls
    finally:
        del vae.decode


def test_a_failing_decode_of_several_jobs_is_made_again_one_by_one(tiny: LoadedModel) -> None:
    two = make_request(seed=1, num_images=2, guidance_scale=1.0)
    one = make_request(seed=3, guidance_scale=1.0, prompt="another")
    broken = make_request(seed=4, num_images=4, guidance_scale=1.0, prompt="a third")
    requests = {"two": two, "one": one, "broken": broken}
    with _failing_decode(tiny, lambda n: n != 2 and n != 1) as calls:
        result = run(EngineCore(tiny, max_batch=8), requests)
    # All three finish in one step: one VAE call for 7 images fails, then each job's own.
    assert calls == [7, 2, 1, 4]
    assert result.reports[-1].unet_rows == [7]
    failed = result.end("broken")
    assert isinstance(failed, JobFailed) and "decoding failed" in failed.message
    # Its steps were done before its decode failed.
    assert [e.step for e in result.stepped("broken")] == [1, 2]
    for key in ("two", "one"):
        difference = largest_difference(result.images(key), alone(tiny, requests[key]))
        assert difference <= BATCH_ROUNDING, (key, difference)


def test_a_failing_scheduler_step_fails_that_job_only(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    requests = {
        "ddim": make_request(seed=1, scheduler="ddim"),
        "euler": make_request(seed=2, scheduler="euler"),
    }

    def step(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("simulated scheduler failure")

    monkeypatch.setattr(diffusers.DDIMScheduler, "step", step)
    result = run(EngineCore(tiny, max_batch=8), requests)
    failed = result.end("ddim")
    assert isinstance(failed, JobFailed) and "scheduler step failed" in failed.message
    assert result.stepped("ddim") == []
    # The UNet call was shared; the euler job went on.
    assert result.unet_rows == [4, 2]
    monkeypatch.undo()
    difference = largest_difference(result.images("euler"), alone(tiny, requests["euler"]))
    assert difference <= BATCH_ROUNDING


# ---------------------------------------------------------------------- 6. steps, previews


def _pipeline_latents(model: LoadedModel, request: GenerationRequest) -> list[torch.Tensor]:
    """The first image's latent after every step of the pipeline called directly."""
    model.activate_loras(request.loras)
    pipeline: Any = model.pipeline_for(request.mode)
    pipeline.scheduler = model.make_scheduler(request.scheduler)
    latents: list[torch.Tensor] = []

    def on_step_end(pipe: Any, i: int, t: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        latents.append(kwargs["latents"][0].clone())
        return kwargs

    pipeline(**diffusers_arguments(request), callback_on_step_end=on_step_end)
    return latents


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"scheduler": "heun", "steps": 3}, 5),  # 2n - 1
        ({**MODES["img2img"], "steps": 4, "strength": 0.75}, 3),  # int(steps * strength)
        ({**MODES["inpaint"], "steps": 5, "strength": 0.5}, 2),
        ({**MODES["img2img"], "steps": 1, "strength": 0.5}, 1),  # lengthened to 2: 1 step
        ({**MODES["img2img"], "scheduler": "heun", "steps": 4, "strength": 0.5}, None),
    ],
    ids=["heun", "img2img", "inpaint", "img2img-short", "img2img-heun"],
)
def test_started_steps_are_the_steps_and_the_pipeline_loop(
    tiny: LoadedModel, fields: dict[str, Any], expected: int | None
) -> None:
    request = make_request(guidance_scale=1.0, **fields)
    result = run(EngineCore(tiny, max_batch=8), {"job": request})
    steps = result.started("job").steps
    if expected is not None:
        assert steps == expected
    assert [(e.step, e.steps) for e in result.stepped("job")] == [
        (n, steps) for n in range(1, steps + 1)
    ]
    assert len(result.reports) == steps
    # The pipeline's own loop runs as many iterations.
    assert len(_pipeline_latents(tiny, request)) == steps


@pytest.mark.parametrize("mode", ["txt2img", "inpaint"])
def test_latents_come_on_the_steps_the_request_wants_a_preview(
    tiny: LoadedModel, mode: str
) -> None:
    fields = {**MODES[mode], "steps": 5, "strength": 1.0, "num_images": 2}
    request = make_request(preview=PreviewRequest(kind="latent", every=2), **fields)
    result = run(EngineCore(tiny, max_batch=8), {"job": request})
    stepped = result.stepped("job")
    assert len(stepped) == 5
    wanted = [e.step for e in stepped if request.wants_preview(e.step, e.steps)]
    assert wanted == [2, 4]  # never after the last step: the images come then
    assert [e.step for e in stepped if e.latent is not None] == wanted
    # The first image's latent after that step, as the pipeline has it.
    pipeline = _pipeline_latents(tiny, request)
    for event in stepped:
        if event.latent is not None:
            assert event.latent.shape == (4, 8, 8)
            assert event.latent.rgb is None  # a latent preview
            expected = latent_to_fp16_bytes(pipeline[event.step - 1])
            assert event.latent.fp16_bytes() == expected, event.step


def test_no_latents_without_a_preview(tiny: LoadedModel) -> None:
    result = run(EngineCore(tiny, max_batch=8), {"job": make_request(steps=3)})
    assert [e.latent for e in result.stepped("job")] == [None] * 3


def test_image_previews_are_decoded_when_the_model_has_a_preview_decoder(
    tiny: LoadedModel, model_cache: Path, tmp_path: Path
) -> None:
    request = make_request(steps=3, preview=PreviewRequest(kind="image"))
    # Without a decoder: the latent, no picture (the worker draws one from the latent).
    plain = run(EngineCore(tiny, max_batch=8), {"job": request}).stepped("job")
    assert [e.latent is not None and e.latent.rgb is None for e in plain] == [True, True, False]
    decoder = build_tiny_taesd(tmp_path / "taesd")
    with_decoder = load_model("tiny", device="cpu", cache_dir=model_cache, preview_decoder=decoder)
    stepped = run(EngineCore(with_decoder, max_batch=8), {"job": request}).stepped("job")
    assert [e.step for e in stepped if e.latent is not None] == [1, 2]
    pipeline = _pipeline_latents(with_decoder, request)
    for event in stepped[:2]:
        assert event.latent is not None and event.latent.rgb is not None
        # The preview decoder's picture of the first image's latent after that step.
        expected = with_decoder.decode_preview(pipeline[event.step - 1])
        assert event.latent.rgb.shape == (64, 64, 3) and event.latent.rgb.dtype == np.uint8
        assert np.array_equal(event.latent.rgb, expected), event.step


# ---------------------------------------------------------------------- 7. bad requests


def test_a_request_that_cannot_be_prepared_fails_and_the_core_goes_on(tiny: LoadedModel) -> None:
    core = EngineCore(tiny, max_batch=8)
    good = make_request(steps=3, seed=5)
    core.add(JobSpec("good", good))
    first = core.step()
    bad = [
        make_request(loras=(("missing", 1.0),)),  # no such LoRA
        make_request(scheduler="no-such-scheduler"),
        replace(good, mode="upscale"),  # type: ignore[arg-type]
    ]
    for k, request in enumerate(bad):
        (event,) = core.add(JobSpec(f"bad{k}", request))
        assert isinstance(event, JobFailed) and event.key == f"bad{k}", event
        assert f"bad{k}" not in core
    assert "unknown LoRA 'missing'" in core.add(JobSpec("again", bad[0]))[0].message  # type: ignore[union-attr]
    assert len(core) == 1
    rest = [core.step(), core.step()]
    assert not core.busy
    events = first.events + [e for report in rest for e in report.events]
    assert [e.step for e in events if isinstance(e, JobStepped)] == [1, 2, 3]
    (finished,) = [e for e in events if isinstance(e, JobFinished)]
    assert np.array_equal(np.asarray(finished.images[0]), alone(tiny, good)[0])


def test_a_mode_the_model_cannot_do_fails(tiny_inpaint: LoadedModel) -> None:
    core = EngineCore(tiny_inpaint, max_batch=8)
    (event,) = core.add(JobSpec("x", make_request()))
    assert isinstance(event, JobFailed) and "not available" in event.message
    assert not core.busy
