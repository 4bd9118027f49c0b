"""The bridge between the event loop and an engine core (vLLM's async front end).

:class:`EngineWorker` is the engine loop of one engine, on the event loop: at every step
boundary it admits waiting jobs in fairness order while they fit (:mod:`.batching`),
hands aborts to the engine, runs one step there (:class:`~.handle.EngineHandle`: on the
engine thread, or in a Ray actor) and dispatches that step's events: one call per step,
whatever the batch holds. Each event becomes
messages for the job's session (progress and previews latest-wins, built only when the
session is about to send them); a job's terminal message goes through :meth:`Job.end`.
Finished images are encoded in the encoder pool, beside the next steps.

With several models (the embedded engine's :class:`~.models.ModelSet`), a job joins
only when its model is loaded; one whose model is not waits in the queue while the
model loads, and the jobs behind it for loaded models go on (:meth:`EngineWorker._admit`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from functools import partial

import numpy as np
from PIL import Image

from latentcast.protocol import (
    Complete,
    Error,
    ErrorCode,
    ImagePreview,
    ImageResult,
    LatentPreview,
    OutputRequest,
    Progress,
    Started,
    Timings,
)
from latentcast.protocol.limits import SEED_SPACE

from ..jobs import Job
from ..metrics import Metrics
from ..models import LatentRGB
from ..previews import encode_image, encode_preview, rgb_preview
from ..scheduler import Scheduler, stopped_message
from .batching import GroupKey
from .events import (
    EngineEvent,
    JobFailed,
    JobFinished,
    JobSpec,
    JobStarted,
    JobStepped,
    JobStopped,
    LatentSnapshot,
)
from .facts import ModelFacts
from .handle import EngineHandle, EngineLost
from .models import ModelSet

logger = logging.getLogger("latentcast.engine")

#: Seconds between two health checks of an idle engine.
HEALTH_INTERVAL = 2.0


def encode_results(
    images: list[Image.Image], output: OutputRequest, first_seed: int
) -> list[ImageResult]:
    """Encode finished images as the client asked (runs in the encoder pool)."""
    return [
        ImageResult(
            data=encode_image(image, output.format, output.quality),
            format=output.format,
            width=image.width,
            height=image.height,
            seed=(first_seed + k) % SEED_SPACE,
        )
        for k, image in enumerate(images)
    ]


@dataclass(eq=False)
class _Running:
    """A job in the engine, as the loop side knows it."""

    job: Job
    group: GroupKey
    rows: int
    #: The model's name (None: the engine's one model).
    model: str | None = None
    #: The engine prepared it (JobStarted): from then on, losing the engine loses it.
    started: bool = False


class EngineWorker:
    """The engine loop: admit, step, dispatch; forever (until cancelled)."""

    def __init__(
        self,
        engine: EngineHandle,
        scheduler: Scheduler,
        encoder: Executor,
        metrics: Metrics,
        peers: Callable[[], Iterable[EngineWorker]] = tuple,
        models: ModelSet | None = None,
    ) -> None:
        """``peers``: every engine's worker (this one included), for job placement;
        ``models``: the embedded engine's models (None: the engine's one model)."""
        self._engine = engine
        self._models = models
        self._peers = peers
        self._scheduler = scheduler
        self._encoder = encoder
        self._metrics = metrics
        self._keys = itertools.count()
        self._running: dict[int, _Running] = {}
        self._finishing: set[asyncio.Task[None]] = set()
        self._alive = True
        self._name = engine.name
        metrics.engine_alive.labels(engine=self._name).set(1)
        metrics.engine_jobs_running.labels(engine=self._name).set(0)

    @property
    def engine(self) -> EngineHandle:
        return self._engine

    @property
    def running_jobs(self) -> list[Job]:
        """The jobs on this engine now, oldest first."""
        return sorted((run.job for run in self._running.values()), key=lambda job: job.seq)

    @property
    def alive(self) -> bool:
        """False from the loss of the engine until it answers again."""
        return self._alive

    async def run(self) -> None:
        """Serve the engine forever (until cancelled); outlive the loss of its process."""
        while True:
            try:
                await self._serve()
            except EngineLost as lost:
                self._lost(lost)
                await self._engine.recover()
                self._alive = True
                self._metrics.engine_alive.labels(engine=self._name).set(1)

    async def _serve(self) -> None:
        while True:
            if not self._running:
                await self._wait_for_work()
            specs = self._admit()
            if specs:
                self._dispatch(await self._engine.add(specs))
            if not self._running:
                continue
            aborts = [key for key, run in self._running.items() if run.job.stop_requested]
            if aborts:
                # Its own hand-off: a stopped job hears at this boundary, not after the
                # next step of the jobs that go on.
                self._dispatch(await self._engine.abort(aborts))
                if not self._running:
                    continue
            report = await self._engine.step()
            if report.unet_rows:
                self._metrics.step_seconds.observe(report.seconds)
                for rows in report.unet_rows:
                    self._metrics.unet_rows.observe(rows)
                self._metrics.engine_steps.labels(engine=self._name).inc(len(report.unet_rows))
                self._metrics.engine_rows.labels(engine=self._name).inc(sum(report.unet_rows))
            self._dispatch(report.events)

    async def _wait_for_work(self) -> None:
        """Until a job waits that can start (its model is loaded); an idle engine is
        checked every HEALTH_INTERVAL meanwhile, so that /ready and /metrics know of an
        engine that died while idle."""
        while True:
            try:
                async with asyncio.timeout(HEALTH_INTERVAL):
                    if self._models is None:
                        await self._scheduler.wait_for_waiting()
                        return
                    while not self._startable_waiting():
                        await self._scheduler.wait_for_change()
                    return
            except TimeoutError:
                await self._engine.ping()

    def _startable_waiting(self) -> bool:
        """Whether a waiting job's model is loaded; the others' models are asked for."""
        models = self._models
        assert models is not None
        for job in self._scheduler.waiting_in_order():
            name = models.name_of(job.request)
            if models.admits(name):
                return True
            models.want(name, job)
        return False

    def _facts_of(self, model: str | None) -> ModelFacts:
        if self._models is None or model is None:
            return self._engine.facts
        return self._models.facts_of(model)

    def _lost(self, lost: EngineLost) -> None:
        """The engine's process is gone: its jobs that had started end with
        ``generation_failed``; those it never prepared wait again in their places."""
        self._alive = False
        self._metrics.engine_alive.labels(engine=self._name).set(0)
        running = sorted(self._running.values(), key=lambda run: run.job.seq)
        self._running.clear()
        for run in running:
            self._left(run)
        self._running_changed(-len(running))
        logger.error(
            "%s: %d running jobs lost; waiting for the engine to come back",
            lost,
            sum(run.started for run in running),
        )
        for run in running:
            job = run.job
            if not run.started:
                logger.info("session=%s job=%s back in the queue", job.session_id, job.id)
                self._scheduler.requeue(job)
                continue
            logger.error("session=%s job=%s failed: %s", job.session_id, job.id, lost)
            job.end(
                Error(
                    id=job.id,
                    code=ErrorCode.GENERATION_FAILED,
                    message=f"generation failed: {lost}; submit the job again",
                )
            )

    def _running_changed(self, delta: int) -> None:
        self._metrics.jobs_running.inc(delta)
        self._metrics.engine_jobs_running.labels(engine=self._name).set(len(self._running))

    # ------------------------------------------------------------------ admission

    def _admit(self) -> list[JobSpec]:
        """Take waiting jobs, in fairness order, while the batch policy lets them join.

        With several engines, a busy one leaves the next job to another engine whose
        running group it can join (it takes it at that engine's next step boundary): a
        shared UNet call instead of one more group taking turns here. An idle engine
        takes any job at once.

        With several models, a job whose model is not loaded is passed over (its model is
        asked for, :meth:`ModelSet.want`): it does not hold up the jobs behind it for
        loaded models, which are admitted in the same order among themselves.
        """
        if self._models is not None:
            return self._admit_of_models(self._models)
        facts = self._engine.facts
        policy = self._engine.policy
        groups = self.groups()
        specs = []
        while (job := self._scheduler.peek_next()) is not None:
            group, rows = facts.group_key(job.request), facts.job_rows(job.request)
            if not policy.admits(groups, group, rows):
                break
            if self._running and group not in groups and self._joinable_elsewhere(group, rows):
                break
            self._scheduler.start_next()
            specs.append(self._join(job, group, rows, None, groups))
        self._running_changed(len(specs))
        return specs

    def _admit_of_models(self, models: ModelSet) -> list[JobSpec]:
        policy = self._engine.policy
        groups = self.groups()
        specs = []
        for job in self._scheduler.waiting_in_order():
            name = models.name_of(job.request)
            if not models.admits(name):
                models.want(name, job)
                continue
            facts = models.facts_of(name)
            # Jobs of two models never share a UNet call: the model is part of the group.
            group = replace(facts.group_key(job.request), model=name)
            rows = facts.job_rows(job.request)
            if not policy.admits(groups, group, rows):
                break
            self._scheduler.start(job)
            models.acquire(name)
            specs.append(self._join(job, group, rows, name, groups))
        self._running_changed(len(specs))
        return specs

    def _join(
        self, job: Job, group: GroupKey, rows: int, model: str | None, groups: Counter[GroupKey]
    ) -> JobSpec:
        """``job`` (started in the scheduler) joins this engine."""
        groups[group] += rows
        key = next(self._keys)
        self._running[key] = _Running(job, group, rows, model)
        logger.info(
            "session=%s job=%s started (%d rows, %d jobs in the engine%s)",
            job.session_id,
            job.id,
            rows,
            len(self._running),
            "" if model is None else f", model {model!r}",
        )
        return JobSpec(key, job.request)

    def _left(self, run: _Running) -> None:
        """``run`` left the engine: its model may be idle now."""
        if self._models is not None and run.model is not None:
            self._models.release(run.model)

    def groups(self) -> Counter[GroupKey]:
        """Rows of each group running on this engine now."""
        groups: Counter[GroupKey] = Counter()
        for run in self._running.values():
            groups[run.group] += run.rows
        return groups

    def _joinable_elsewhere(self, group: GroupKey, rows: int) -> bool:
        """Another live engine runs ``group`` and has room for ``rows`` more in it."""
        for peer in self._peers():
            if peer is self or not peer.alive or peer.engine.facts != self._engine.facts:
                continue
            running = peer.groups()
            if group in running and peer.engine.policy.admits(running, group, rows):
                return True
        return False

    # ------------------------------------------------------------------ events

    def _dispatch(self, events: list[EngineEvent]) -> None:
        now = time.monotonic()
        for event in events:
            run = self._running.get(event.key)  # type: ignore[call-overload]
            if run is None:
                continue
            job = run.job
            if isinstance(event, JobStepped):
                self._stepped(job, event, now)
            elif isinstance(event, JobStarted):
                run.started = True
                self._started(job, event)
            else:
                del self._running[event.key]  # type: ignore[arg-type]
                self._left(run)
                self._running_changed(-1)
                if isinstance(event, JobFinished):
                    self._finished(job, event)
                elif isinstance(event, JobStopped):
                    job.step = event.step
                    job.end(stopped_message(job))
                elif isinstance(event, JobFailed):
                    logger.error(
                        "session=%s job=%s failed: %s", job.session_id, job.id, event.message
                    )
                    job.end(
                        Error(
                            id=job.id,
                            code=ErrorCode.GENERATION_FAILED,
                            message=f"generation failed: {event.message}",
                        )
                    )

    @staticmethod
    def _started(job: Job, event: JobStarted) -> None:
        job.steps = event.steps
        if job.unfinished:
            request = job.request
            job.owner.send(
                Started(
                    id=job.id,
                    seed=request.seed,
                    steps=event.steps,
                    width=request.width,
                    height=request.height,
                    warnings=event.warnings or None,
                )
            )

    def _stepped(self, job: Job, event: JobStepped, now: float) -> None:
        if not job.unfinished:
            return
        job.step = step = event.step
        elapsed_ms = round((now - (job.started_at or now)) * 1000)
        job.owner.send_latest(
            (job.id, "progress"),
            partial(Progress, id=job.id, step=step, steps=event.steps, elapsed_ms=elapsed_ms),
        )
        if event.latent is not None:
            job.owner.send_latest(
                (job.id, "preview"), partial(self._preview, job, step, event.latent)
            )

    def _preview(self, job: Job, step: int, latent: LatentSnapshot) -> LatentPreview | ImagePreview:
        """Built by the session's writer when it is about to send (never if replaced)."""
        preview = job.request.preview
        if preview.kind == "latent":
            return LatentPreview(id=job.id, step=step, shape=latent.shape, data=latent.fp16_bytes())
        # Default size: the latent's own (PROTOCOL.md), also for a decoder's full-size picture.
        max_side = preview.max_side or max(latent.shape[1:])
        if latent.rgb is not None:
            data, width, height = encode_preview(latent.rgb, preview.format, max_side)
        else:
            latent_rgb: LatentRGB | None = self._facts_of(job.request.model).latent_rgb
            assert latent_rgb is not None, "image previews were checked at submit"
            data, width, height = rgb_preview(
                latent.array().astype(np.float32), latent_rgb, preview.format, max_side
            )
        return ImagePreview(
            id=job.id, step=step, format=preview.format, width=width, height=height, data=data
        )

    def _finished(self, job: Job, event: JobFinished) -> None:
        # Encoding runs beside the next steps, so the engine never waits for it (an
        # engine in another process sends the images encoded already).
        task = asyncio.create_task(self._complete(job, event), name=f"complete-{job.id}")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _complete(self, job: Job, event: JobFinished) -> None:
        loop = asyncio.get_running_loop()
        request = job.request
        try:
            results = event.results
            if results is None:
                results = await loop.run_in_executor(
                    self._encoder, encode_results, event.images, request.output, request.seed
                )
        except Exception as exc:
            logger.exception("session=%s job=%s: encoding failed", job.session_id, job.id)
            job.end(
                Error(
                    id=job.id, code=ErrorCode.GENERATION_FAILED, message=f"encoding failed: {exc}"
                )
            )
            return
        now = time.monotonic()
        started_at = job.started_at or now
        self._metrics.job_seconds.observe(now - started_at)
        job.end(
            Complete(
                id=job.id,
                images=results,
                timings=Timings(
                    queued_ms=round((started_at - job.accepted_at) * 1000),
                    run_ms=round((now - started_at) * 1000),
                ),
            )
        )
