"""The engine core: one owner of the model, stepping every running job together.

Shaped as vLLM-Omni's step execution. Jobs join with :meth:`EngineCore.add` (phase 1,
*prepare*), and each :meth:`EngineCore.step` runs one step of one group of compatible
jobs: phase 2, *denoise* (one UNet call for all their rows), phase 3, *scheduler step*
(per job), phase 4, *decode* (the jobs that finished, in one VAE call). Groups take
turns step by step (:mod:`.batching`). Jobs leave at step boundaries: finished, aborted
(:meth:`EngineCore.abort`, a command) or failed.

Plain data in (:class:`~.events.JobSpec`), plain data out (:mod:`.events`): nothing here
knows of sessions or event loops. Every method runs on the engine thread.

Failures: a UNet call that raises (an exception, CUDA out of memory) is made again for
each half of the group, down to single jobs; only a job that fails alone leaves with
:class:`~.events.JobFailed`, and the others' steps are those they would have had. A
decode that fails is retried one job at a time the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from ..models import LoadedModel
from .batching import BatchPolicy, GroupKey
from .decode import decode
from .denoise import advance, predict_noise
from .events import (
    EngineEvent,
    JobFailed,
    JobFinished,
    JobSpec,
    JobStarted,
    JobStepped,
    JobStopped,
    LatentSnapshot,
    StepReport,
)
from .facts import group_key
from .prepare import PreparedJob, prepare
from .prompts import PROMPT_CACHE_SIZE, PromptCache

logger = logging.getLogger("latentcast.engine")


class EngineCore:
    """Running jobs, grouped; one group steps per :meth:`step`. Engine thread only."""

    def __init__(
        self,
        model: LoadedModel,
        *,
        max_batch: int,
        prompt_cache_size: int = PROMPT_CACHE_SIZE,
    ) -> None:
        self.model = model
        self.policy = BatchPolicy(max_batch)
        self.prompts = PromptCache(prompt_cache_size)
        self._sdxl = model.family.name == "sdxl"
        self._jobs: dict[Hashable, PreparedJob] = {}
        #: Jobs by group, in the order they joined; groups in the order they step next.
        self._groups: dict[GroupKey, dict[Hashable, PreparedJob]] = {}

    # ------------------------------------------------------------------ queries

    @property
    def busy(self) -> bool:
        return bool(self._jobs)

    def __len__(self) -> int:
        return len(self._jobs)

    def __contains__(self, key: object) -> bool:
        return key in self._jobs

    # ------------------------------------------------------------------ commands

    def add(self, spec: JobSpec) -> list[EngineEvent]:
        """Phase 1 for a new job: it runs from the next step of its group on."""
        if spec.key in self._jobs:
            raise ValueError(f"a job with key {spec.key!r} is already running")
        try:
            job = prepare(self.model, self.prompts, spec.request)
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            return [JobFailed(spec.key, f"out of device memory while preparing: {exc}")]
        except Exception as exc:
            logger.exception("job %s: prepare failed", spec.key)
            return [JobFailed(spec.key, str(exc))]
        self._jobs[spec.key] = job
        self._groups.setdefault(group_key(self.model, spec), {})[spec.key] = job
        return [JobStarted(spec.key, job.steps, job.warnings)]

    def abort(self, key: Hashable) -> list[EngineEvent]:
        """Take a job out now (it stops after the steps it has done); none if not running."""
        job = self._remove(key)
        if job is None:
            return []
        return [JobStopped(key, job.done)]

    def add_all(self, specs: Sequence[JobSpec]) -> list[EngineEvent]:
        """:meth:`add` each of ``specs``, in order."""
        events: list[EngineEvent] = []
        for spec in specs:
            events += self.add(spec)
        return events

    def abort_all(self, keys: Sequence[Hashable]) -> list[EngineEvent]:
        """:meth:`abort` each of ``keys``."""
        events: list[EngineEvent] = []
        for key in keys:
            events += self.abort(key)
        return events

    def step(self, aborts: Sequence[Hashable] = ()) -> StepReport:
        """Abort ``aborts``, then one step of the next group in turn (if any job runs)."""
        started = time.monotonic()
        events = self.abort_all(aborts)
        unet_rows: list[int] = []
        if self._groups:
            key, group = next(iter(self._groups.items()))
            # The group goes to the back of the line: groups take turns.
            del self._groups[key]
            self._groups[key] = group
            events += self._step_group(key, list(group.items()), unet_rows)
        return StepReport(events, unet_rows, time.monotonic() - started)

    # ------------------------------------------------------------------ internals

    def _remove(self, key: Hashable) -> PreparedJob | None:
        job = self._jobs.pop(key, None)
        if job is None:
            return None
        for group_id, group in list(self._groups.items()):
            if group.pop(key, None) is not None and not group:
                del self._groups[group_id]
        return job

    def _step_group(
        self, key: GroupKey, jobs: list[tuple[Hashable, PreparedJob]], unet_rows: list[int]
    ) -> list[EngineEvent]:
        self.model.activate_loras(key.loras)
        controlnets = [self.model.controlnet(name) for name in key.controlnets]
        events: list[EngineEvent] = []
        stepped: list[tuple[Hashable, PreparedJob]] = []
        for chunk_keys, failure in self._denoise(jobs, unet_rows, controlnets):
            for job_key, job in chunk_keys:
                if failure is not None:
                    self._remove(job_key)
                    events.append(JobFailed(job_key, failure))
                else:
                    stepped.append((job_key, job))
        finished = []
        for job_key, job in stepped:
            events.append(JobStepped(job_key, job.done, job.steps, self._snapshot(job)))
            if job.finished:
                finished.append((job_key, job))
        if finished:
            events += self._finish(finished)
        return events

    def _denoise(
        self,
        jobs: list[tuple[Hashable, PreparedJob]],
        unet_rows: list[int],
        controlnets: Sequence[Any] = (),
    ) -> list[tuple[list[tuple[Hashable, PreparedJob]], str | None]]:
        """Phases 2-3 for ``jobs``; splits the UNet call in halves while it fails.

        ``controlnets``: the modules of the group's ControlNet selection.

        Returns (jobs, failure message or None) pairs covering every job once.
        """
        rows = sum(job.rows for _, job in jobs)
        try:
            predictions = predict_noise(
                self.model.pipeline.unet, [job for _, job in jobs], controlnets
            )
        except Exception as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            if len(jobs) == 1:
                job_key, _ = jobs[0]
                logger.exception("job %s: denoising step failed", job_key)
                return [(jobs, f"denoising failed: {exc}")]
            logger.warning(
                "a UNet call of %d jobs (%d rows) failed (%s: %s); retrying in halves",
                len(jobs),
                rows,
                type(exc).__name__,
                exc,
            )
            half = len(jobs) // 2
            return self._denoise(jobs[:half], unet_rows, controlnets) + self._denoise(
                jobs[half:], unet_rows, controlnets
            )
        unet_rows.append(rows)
        outcome: list[tuple[list[tuple[Hashable, PreparedJob]], str | None]] = []
        for (job_key, job), prediction in zip(jobs, predictions, strict=True):
            try:
                advance(job, prediction)
            except Exception as exc:
                logger.exception("job %s: scheduler step failed", job_key)
                outcome.append(([(job_key, job)], f"scheduler step failed: {exc}"))
            else:
                outcome.append(([(job_key, job)], None))
        return outcome

    def _snapshot(self, job: PreparedJob) -> LatentSnapshot | None:
        request = job.request
        if not request.wants_preview(job.done, job.steps):
            return None
        rgb = None
        if request.preview.kind == "image" and self.model.preview_decoder is not None:
            rgb = self.model.decode_preview(job.latents[:1])
        return LatentSnapshot(job.latents, rgb)

    def _finish(self, finished: list[tuple[Hashable, PreparedJob]]) -> list[EngineEvent]:
        """Phase 4: decode the finished jobs together; one by one if that fails."""
        for job_key, _ in finished:
            self._remove(job_key)
        try:
            images = decode([job for _, job in finished], self._sdxl)
        except Exception as exc:
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                torch.cuda.empty_cache()
            if len(finished) == 1:
                job_key, _ = finished[0]
                logger.exception("job %s: decoding failed", job_key)
                return [JobFailed(job_key, f"decoding failed: {exc}")]
            logger.warning("decoding %d jobs together failed (%s); one by one", len(finished), exc)
            events: list[EngineEvent] = []
            for one in finished:
                events += self._finish([one])
            return events
        return [
            JobFinished(job_key, job_images)
            for (job_key, _), job_images in zip(finished, images, strict=True)
        ]
