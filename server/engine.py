"""The engine: one owner of the model, one thread that runs it, one job at a time.

Two halves, as in vLLM's engine core and its async front end:

* :class:`Engine` runs on the engine thread only. :meth:`Engine.generate` turns a
  :class:`GenerationRequest` into images, reporting each denoising step to a
  :class:`StepListener` and stopping at the first step boundary after ``stop`` is set,
  without running the VAE decode.
* :class:`EngineWorker` is the asyncio side: it takes the next job from the scheduler,
  runs it on the :class:`EngineThread`, turns step reports into messages for the job's
  session (latest-wins, built lazily) and ends the job exactly once.

The job interface stays narrow (a job in, per-step events out, a stop flag) so that the
inside can move to step-level batching without touching sessions or the scheduler.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
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

from .images import composite
from .jobs import GenerationRequest, Job
from .metrics import Metrics
from .models import LatentRGB, LoadedModel
from .previews import encode_image, encode_preview, latent_to_fp16_bytes, rgb_preview
from .scheduler import Scheduler, stopped_message

logger = logging.getLogger("latentcast.engine")

T = TypeVar("T")


class JobStopped(Exception):
    """Raised inside the pipeline's step callback to leave the denoising loop early."""

    def __init__(self, step: int) -> None:
        super().__init__(f"stopped after step {step}")
        self.step = step


class EngineThread:
    """One daemon thread that runs whatever touches the model, in submission order.

    A daemon, so that a process told to exit does not wait for a model still loading.
    """

    def __init__(self, name: str = "latentcast-engine") -> None:
        self._calls: queue.SimpleQueue[
            tuple[Callable[[], Any], concurrent.futures.Future[Any]] | None
        ] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((partial(fn, *args, **kwargs), future))
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Let the thread end once the calls already queued have run."""
        self._calls.put(None)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float) -> bool:
        """Wait (blocking) for the thread to end; False if it is still busy after ``timeout``."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _serve(self) -> None:
        while (item := self._calls.get()) is not None:
            fn, future = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                future.set_exception(exc)


class LatentSnapshot:
    """A copy of the first image's latent after a step, taken on the engine thread.

    On CUDA the copy goes to pinned memory without blocking the engine; whoever reads
    it first waits for that copy only (an event), never for later steps.
    """

    def __init__(self, latents: torch.Tensor, rgb: np.ndarray | None = None) -> None:
        #: The preview decoder's picture of this latent, when the job wants one and the
        #: model has a decoder (decoded on the engine thread, where the model lives).
        self.rgb = rgb
        first = latents[0].detach()
        self.shape: tuple[int, int, int] = tuple(first.shape)  # type: ignore[assignment]
        self._ready: torch.cuda.Event | None = None
        if first.is_cuda:
            self._host = torch.empty(self.shape, dtype=torch.float16, pin_memory=True)
            self._host.copy_(first, non_blocking=True)
            self._ready = torch.cuda.Event()
            self._ready.record()
        else:
            self._host = first.to(dtype=torch.float16, copy=True)

    def _wait(self) -> torch.Tensor:
        if self._ready is not None:
            self._ready.synchronize()
        return self._host

    def array(self) -> np.ndarray:
        """The latent as float16 [c, h, w] in host memory."""
        return self._wait().numpy()

    def fp16_bytes(self) -> bytes:
        """The payload of a latent preview (PROTOCOL.md: little-endian float16, C order)."""
        return latent_to_fp16_bytes(self._wait())


#: Prompt encodings kept by :class:`PromptCache`. A canvas session resubmits the same
#: prompt many times a second, and a handful of sessions rarely juggle more than a few
#: prompts each; an entry is small (SD 1.x: 2 x 77 x 768 values, SDXL: 2 x 77 x 2048
#: plus pooled; 64 SDXL entries in float16 hold about 40 MB of device memory).
PROMPT_CACHE_SIZE = 64


@dataclass(frozen=True)
class PromptKey:
    """Everything a pipeline's ``encode_prompt`` output depends on, for one model."""

    model: str
    prompt: str
    negative_prompt: str
    #: Classifier-free guidance on: the negative prompt is encoded too.
    guidance: bool
    #: The job's LoRA selection: text-encoder LoRA layers change the embeddings.
    loras: tuple[tuple[str, float], ...]
    clip_skip: int | None = None


class PromptCache:
    """Prompt embeddings, least recently used first out, at most ``size`` entries.

    Engine thread only (no locks). :meth:`arguments` gives the pipeline keyword
    arguments that replace ``prompt``/``negative_prompt``: computed with the pipeline's
    own ``encode_prompt`` and the arguments its ``__call__`` would use, so the images
    are byte-identical to a text-prompt call. Encoded for one image: the pipeline
    repeats them for ``num_images_per_prompt`` itself.
    """

    def __init__(self, size: int = PROMPT_CACHE_SIZE) -> None:
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[PromptKey, dict[str, torch.Tensor | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    @staticmethod
    def key(model: LoadedModel, pipeline: Any, request: GenerationRequest) -> PromptKey:
        return PromptKey(
            model=model.name,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            guidance=uses_guidance(pipeline, request.guidance_scale),
            loras=tuple((str(name), float(scale)) for name, scale in request.loras),
        )

    def arguments(
        self, model: LoadedModel, pipeline: Any, request: GenerationRequest
    ) -> dict[str, torch.Tensor | None]:
        """``prompt_embeds`` & co. for ``request`` (its LoRAs already active)."""
        key = self.key(model, pipeline, request)
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return dict(entry)
        self.misses += 1
        entry = _encode_prompt(pipeline, key)
        self._entries[key] = entry
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return dict(entry)


def uses_guidance(pipeline: Any, guidance_scale: float) -> bool:
    """The pipelines' ``do_classifier_free_guidance`` rule for ``guidance_scale``."""
    return guidance_scale > 1 and pipeline.unet.config.time_cond_proj_dim is None


def _encode_prompt(pipeline: Any, key: PromptKey) -> dict[str, torch.Tensor | None]:
    """What ``pipeline.__call__`` would compute from the text (diffusers 0.42)."""
    common: dict[str, Any] = {
        "prompt": key.prompt,
        "device": pipeline._execution_device,
        "num_images_per_prompt": 1,
        "do_classifier_free_guidance": key.guidance,
        "negative_prompt": key.negative_prompt,
        "lora_scale": None,  # the pipelines' default (no cross_attention_kwargs scale)
        "clip_skip": key.clip_skip,
    }
    with torch.no_grad():
        encoded = pipeline.encode_prompt(**common)
    names = ["prompt_embeds", "negative_prompt_embeds"]
    if len(encoded) == 4:  # SDXL: both text encoders' pooled outputs too
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return dict(zip(names, encoded, strict=True))


class StepListener(Protocol):
    """What the engine reports while it runs a job; called on the engine thread."""

    def started(self, steps: int, warnings: list[str]) -> None: ...

    def step(self, step: int, steps: int, latent: LatentSnapshot | None) -> None: ...


class Engine:
    """Owns the loaded pipeline. Every method here runs on the engine thread."""

    def __init__(self, model: LoadedModel, prompt_cache_size: int = PROMPT_CACHE_SIZE) -> None:
        self.model = model
        self.prompts = PromptCache(prompt_cache_size)

    def count_steps(self, pipeline: Any, request: GenerationRequest) -> int:
        """The denoising iterations ``request`` will really run (what ``progress`` counts).

        Leaves a fresh scheduler of the job's kind on ``pipeline``, ready for the run.
        """
        model = self.model
        pipeline.scheduler = model.make_scheduler(request.scheduler)
        pipeline.scheduler.set_timesteps(request.schedule_steps)
        if request.mode == "txt2img":
            steps = len(pipeline.scheduler.timesteps)
        else:
            # The pipeline's own rule for how much of the schedule strength skips.
            timesteps, _ = pipeline.get_timesteps(request.schedule_steps, request.strength, "cpu")
            steps = len(timesteps)
        pipeline.scheduler = model.make_scheduler(request.scheduler)
        return steps

    def prompt_warnings(self, pipeline: Any, request: GenerationRequest) -> list[str]:
        """Say so when a prompt is longer than the text encoder's window (it is cut there)."""
        tokenizer = pipeline.tokenizer
        window = tokenizer.model_max_length
        warnings = []
        for field, text in (
            ("prompt", request.prompt),
            ("negative_prompt", request.negative_prompt),
        ):
            count = len(tokenizer(text).input_ids)
            if count > window:
                warnings.append(
                    f"{field} is {count - 2} tokens; the text encoder reads the first "
                    f"{window - 2} and ignored the last {count - window}"
                )
        return warnings

    def generate(
        self, request: GenerationRequest, listener: StepListener, stop: threading.Event
    ) -> list[Image.Image]:
        """Run one job to its images. Raises JobStopped when ``stop`` is set."""
        if stop.is_set():
            raise JobStopped(0)
        model = self.model
        pipeline = model.pipeline_for(request.mode)
        model.activate_loras(request.loras)
        steps = self.count_steps(pipeline, request)
        listener.started(steps, self.prompt_warnings(pipeline, request))
        decode_previews = request.preview.kind == "image" and model.preview_decoder is not None

        def on_step_end(
            pipe: Any, index: int, timestep: Any, tensors: dict[str, torch.Tensor]
        ) -> dict[str, torch.Tensor]:
            step = index + 1
            snapshot = None
            if request.wants_preview(step, steps):
                latents = tensors["latents"]
                rgb = model.decode_preview(latents[:1]) if decode_previews else None
                snapshot = LatentSnapshot(latents, rgb)
            listener.step(step, steps, snapshot)
            if stop.is_set() and step < steps:
                raise JobStopped(step)
            return {}

        arguments = self.pipeline_arguments(request)
        del arguments["prompt"], arguments["negative_prompt"]
        arguments.update(self.prompts.arguments(model, pipeline, request))
        try:
            output = pipeline(**arguments, callback_on_step_end=on_step_end)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise
        images = list(output.images)
        if request.mode == "inpaint":
            assert request.init_image is not None and request.mask is not None
            images = [composite(image, request.init_image, request.mask) for image in images]
        return images

    def pipeline_arguments(self, request: GenerationRequest) -> dict[str, Any]:
        """The keyword arguments of the pipeline call for ``request``.

        Public so that a test (and the benchmark) can call the pipeline directly with
        exactly what the server uses, and compare the bytes. The text is what the server
        encodes; :meth:`generate` passes the :class:`PromptCache`'s embeddings of it
        instead of ``prompt``/``negative_prompt``, which gives the same bytes.
        """
        arguments: dict[str, Any] = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt,
            "num_inference_steps": request.schedule_steps,
            "guidance_scale": request.guidance_scale,
            "num_images_per_prompt": request.num_images,
            # CPU generators: the same noise on every device, image k from seed + k.
            "generator": [
                torch.Generator(device="cpu").manual_seed((request.seed + k) % SEED_SPACE)
                for k in range(request.num_images)
            ],
            "output_type": "pil",
        }
        if request.mode == "txt2img":
            arguments.update(width=request.width, height=request.height)
        else:
            # The images were scaled to the job size when the job was accepted.
            arguments.update(image=request.init_image, strength=request.strength)
        if request.mode == "inpaint":
            arguments.update(mask_image=request.mask, width=request.width, height=request.height)
        return arguments


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


@dataclass
class _JobReporter:
    """A job's :class:`StepListener`: hands each report to the event loop."""

    job: Job
    loop: asyncio.AbstractEventLoop
    metrics: Metrics
    latent_rgb: LatentRGB | None
    last_step_at: float = 0.0

    def started(self, steps: int, warnings: list[str]) -> None:
        self.last_step_at = time.monotonic()
        self.loop.call_soon_threadsafe(self._started, steps, warnings)

    def step(self, step: int, steps: int, latent: LatentSnapshot | None) -> None:
        now = time.monotonic()
        self.metrics.step_seconds.observe(now - self.last_step_at)
        self.last_step_at = now
        self.loop.call_soon_threadsafe(self._step, step, steps, now, latent)

    # On the event loop from here on.

    def _started(self, steps: int, warnings: list[str]) -> None:
        job = self.job
        job.steps = steps
        if job.unfinished:
            request = job.request
            job.owner.send(
                Started(
                    id=job.id,
                    seed=request.seed,
                    steps=steps,
                    width=request.width,
                    height=request.height,
                    warnings=warnings or None,
                )
            )

    def _step(self, step: int, steps: int, at: float, latent: LatentSnapshot | None) -> None:
        job = self.job
        if not job.unfinished:
            return
        job.step = step
        elapsed_ms = round((at - (job.started_at or at)) * 1000)
        job.owner.send_latest(
            (job.id, "progress"),
            partial(Progress, id=job.id, step=step, steps=steps, elapsed_ms=elapsed_ms),
        )
        if latent is not None:
            job.owner.send_latest((job.id, "preview"), partial(self._preview, step, latent))

    def _preview(self, step: int, latent: LatentSnapshot) -> LatentPreview | ImagePreview:
        """Built by the session's writer when it is about to send (never if replaced)."""
        preview = self.job.request.preview
        if preview.kind == "latent":
            return LatentPreview(
                id=self.job.id, step=step, shape=latent.shape, data=latent.fp16_bytes()
            )
        # Default size: the latent's own (PROTOCOL.md), also for a decoder's full-size picture.
        max_side = preview.max_side or max(latent.shape[1:])
        if latent.rgb is not None:
            data, width, height = encode_preview(latent.rgb, preview.format, max_side)
        else:
            assert self.latent_rgb is not None, "image previews were checked at submit"
            data, width, height = rgb_preview(
                latent.array().astype(np.float32), self.latent_rgb, preview.format, max_side
            )
        return ImagePreview(
            id=self.job.id, step=step, format=preview.format, width=width, height=height, data=data
        )


class EngineWorker:
    """The engine loop: next job from the scheduler, run it, end it; forever."""

    def __init__(
        self,
        engine: Engine,
        thread: EngineThread,
        scheduler: Scheduler,
        encoder: Executor,
        metrics: Metrics,
    ) -> None:
        self._engine = engine
        self._thread = thread
        self._scheduler = scheduler
        self._encoder = encoder
        self._metrics = metrics
        self._finishing: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        while True:
            job = await self._scheduler.next_job()
            self._metrics.jobs_running.set(1)
            try:
                await self._run(job)
            finally:
                self._metrics.jobs_running.set(0)

    async def _run(self, job: Job) -> None:
        if not job.unfinished:
            return
        logger.info("session=%s job=%s started", job.session_id, job.id)
        reporter = _JobReporter(
            job, asyncio.get_running_loop(), self._metrics, self._engine.model.family.latent_rgb
        )
        try:
            images = await self._thread.call(
                self._engine.generate, job.request, reporter, job.stop_requested
            )
        except JobStopped as stopped:
            job.step = stopped.step
            job.end(stopped_message(job))
            return
        except Exception as exc:
            logger.exception("session=%s job=%s failed", job.session_id, job.id)
            job.end(
                Error(
                    id=job.id, code=ErrorCode.GENERATION_FAILED, message=f"generation failed: {exc}"
                )
            )
            return
        # Encoding runs beside the next job, so the engine never waits for it.
        task = asyncio.create_task(self._complete(job, images), name=f"complete-{job.id}")
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def _complete(self, job: Job, images: list[Image.Image]) -> None:
        loop = asyncio.get_running_loop()
        request = job.request
        try:
            results = await loop.run_in_executor(
                self._encoder, encode_results, images, request.output, request.seed
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
