"""Several models on one engine thread: which are loaded, loading them, unloading them.

* :class:`ModelResidency` is the pure state (unit-tested on its own): the resident
  models in least-recently-used order, how many jobs each has in the engine, and the
  choice of the model to unload. A model with running or admitted jobs is never chosen.
* :class:`ModelSet` is its asyncio face, on the event loop. It owns one
  :class:`~.core.EngineCore` per resident model (created, stepped and dropped only on
  the engine thread; :class:`~.local.LocalEngine` routes each command to the right
  one), loads models on a loader thread of its own (one torch thread), hands each
  loaded model to the engine thread, and unloads the least recently used idle model
  when ``--max-resident-models`` are loaded and another one is wanted.

The engine loop (:class:`~.worker.EngineWorker`) asks :meth:`ModelSet.admits` before it
admits a job; a job whose model is not loaded stays in the queue (its ``queued`` says
``loading``) and :meth:`ModelSet.want` starts the load, while jobs for loaded models go
on. When every loaded model is busy and one more is wanted, the least recently used one
*retires*: it takes no new jobs, and is unloaded when its last job leaves, so a wanted
model cannot be starved by a stream of jobs for the others.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Collection, Coroutine, Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from latentcast.protocol import Error, ErrorCode

from ..config import ModelSpec, ServerConfig
from ..jobs import GenerationRequest, Job, JobState
from ..metrics import Metrics
from ..models import LoadedModel, load_model
from .core import EngineCore
from .events import EngineEvent, JobSpec, StepReport
from .facts import ModelFacts
from .thread import EngineThread

if TYPE_CHECKING:
    from ..scheduler import Scheduler

logger = logging.getLogger("latentcast.engine")

#: The name of the thread that loads models after start.
LOADER_THREAD_NAME = "latentcast-loader"
#: Loads and unloads remembered in :attr:`ModelSet.history` (for benchmarks and tests).
HISTORY_LENGTH = 256


@dataclass(frozen=True)
class ModelEvent:
    """One load or unload, as :attr:`ModelSet.history` keeps it."""

    kind: str  # "load", "unload" or "load_failed"
    model: str
    seconds: float
    #: Memory in use (:func:`memory_in_use`) before and after an unload.
    memory_before: int | None = None
    memory_after: int | None = None


@dataclass
class ModelResidency:
    """Which models are loaded, least recently used first, and their jobs. No I/O."""

    capacity: int
    _resident: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _jobs: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {self.capacity}")

    @property
    def resident(self) -> tuple[str, ...]:
        """The loaded models, least recently used first."""
        return tuple(self._resident)

    def __contains__(self, name: object) -> bool:
        return name in self._resident

    def __len__(self) -> int:
        return len(self._resident)

    def add(self, name: str) -> None:
        """``name`` was loaded: the most recently used."""
        self._resident[name] = None
        self._resident.move_to_end(name)

    def remove(self, name: str) -> None:
        """``name`` is being unloaded.

        Raises:
            ValueError: it still has jobs in the engine.
        """
        if self._jobs[name]:
            raise ValueError(f"model {name!r} has {self._jobs[name]} jobs in the engine")
        self._resident.pop(name, None)

    def acquire(self, name: str) -> None:
        """A job of ``name`` joins the engine: the model is busy and the most recently used."""
        if name not in self._resident:
            raise ValueError(f"model {name!r} is not loaded")
        self._jobs[name] += 1
        self._resident.move_to_end(name)

    def release(self, name: str) -> None:
        """A job of ``name`` left the engine."""
        if self._jobs[name] <= 0:
            raise ValueError(f"model {name!r} has no job in the engine")
        self._jobs[name] -= 1
        if not self._jobs[name]:
            del self._jobs[name]

    def jobs(self, name: str) -> int:
        return self._jobs[name]

    def busy(self, name: str) -> bool:
        return self._jobs[name] > 0

    def victim(self, keep: Collection[str] = ()) -> str | None:
        """The model to unload to make room: the least recently used idle one not in
        ``keep``; None when every loaded model is busy (or kept)."""
        for name in self._resident:
            if not self._jobs[name] and name not in keep:
                return name
        return None

    def least_recently_used(self, keep: Collection[str] = ()) -> str | None:
        """The least recently used loaded model not in ``keep``, busy or not."""
        return next((name for name in self._resident if name not in keep), None)


def memory_in_use(device: torch.device) -> int | None:
    """Bytes in use: on CUDA the tensors allocated on ``device``, else this process's
    resident set (psutil; /proc where psutil is missing); None when unknown."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        import psutil
    except ImportError:
        try:
            with open("/proc/self/statm") as statm:
                return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return None
    return int(psutil.Process().memory_info().rss)


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.0f} MiB"


def _load_with_one_thread(spec: ModelSpec, config: ServerConfig) -> LoadedModel:
    """On the loader thread: one torch thread there (torch's count is per thread), so a
    load beside running jobs does not take the engine's cores."""
    torch.set_num_threads(1)
    return load_model(spec.spec, name=spec.name, **config.model_arguments(spec.name))


class ModelSet:
    """The models of one embedded engine: their facts, cores, loads and unloads.

    Cores are touched only on the engine thread; the bookkeeping only on the event loop.
    """

    def __init__(
        self,
        config: ServerConfig,
        engine_thread: EngineThread,
        scheduler: Scheduler,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._specs = {spec.name: spec for spec in config.models}
        self.default = config.default_model.name
        self._thread = engine_thread
        self._scheduler = scheduler
        self._metrics = metrics
        self._residency = ModelResidency(config.resident_models)
        self._loader: EngineThread | None = None
        #: Every model's facts, read when it was first loaded (at start).
        self.facts: dict[str, ModelFacts] = {}
        #: The resident models' cores: written on the engine thread only.
        self._cores: dict[str, EngineCore] = {}
        #: The model whose core took the last engine step: the cores take turns.
        self._last_stepped: str | None = None
        self._max_batch = 0
        #: The model :meth:`start` is loading (the one that failed, if it raised).
        self.starting: ModelSpec | None = None
        #: Jobs waiting for each model not loaded, in the order the models were wanted.
        self._wanted: OrderedDict[str, dict[Job, None]] = OrderedDict()
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._unloading: dict[str, asyncio.Task[None]] = {}
        #: A busy model that takes no new jobs until it is unloaded to make room.
        self._retiring: str | None = None
        #: The jobs each model was just loaded for: it is not unloaded while they wait.
        self._loaded_for: dict[str, list[Job]] = {}
        #: The latest loads and unloads, oldest first.
        self.history: deque[ModelEvent] = deque(maxlen=HISTORY_LENGTH)

    # ------------------------------------------------------------------ queries

    @property
    def names(self) -> tuple[str, ...]:
        """Every model, the default first."""
        return tuple(self._specs)

    @property
    def resident(self) -> tuple[str, ...]:
        """The loaded models, least recently used first."""
        return self._residency.resident

    @property
    def loader_thread(self) -> EngineThread:
        """The thread models are loaded on after start (created on first use)."""
        if self._loader is None:
            self._loader = EngineThread(name=LOADER_THREAD_NAME)
        return self._loader

    def name_of(self, request: GenerationRequest) -> str:
        return self.default if request.model is None else request.model

    def loaded(self, name: str) -> LoadedModel | None:
        """The loaded model ``name``; None while it is not loaded."""
        core = self._cores.get(name)
        return None if core is None else core.model

    def admits(self, name: str) -> bool:
        """Whether a job of ``name`` may join the engine now: loaded, not being unloaded,
        not retiring to make room for another."""
        return name in self._residency and name != self._retiring

    def facts_of(self, name: str) -> ModelFacts:
        return self.facts[name]

    # ------------------------------------------------------------------ start

    async def start(self, max_batch: int) -> None:
        """Load every model once for its facts, the default first on the engine thread;
        keep the first ``--max-resident-models`` loaded. Raises what a load raised."""
        self._max_batch = max_batch
        config = self._config
        default = config.default_model
        self.starting = default
        started = time.monotonic()
        model = await self._thread.call(
            load_model, default.spec, name=default.name, **config.model_arguments(default.name)
        )
        await self._install(model, time.monotonic() - started)
        for spec in config.models[1:]:
            self.starting = spec
            started = time.monotonic()
            model = await self.loader_thread.call(_load_with_one_thread, spec, config)
            await self._install(model, time.monotonic() - started)
            del model
            if len(self._residency) > self._residency.capacity:
                await self._unload(spec.name)

    # ------------------------------------------------------------------ jobs

    def acquire(self, name: str) -> None:
        """A job of ``name`` was admitted to the engine."""
        self._residency.acquire(name)

    def release(self, name: str) -> None:
        """A job of ``name`` left the engine (finished, stopped, failed)."""
        self._residency.release(name)
        if not self._residency.busy(name) and self._wanted:
            self._plan()

    def want(self, name: str, job: Job) -> None:
        """``job`` waits for ``name``, which is not loaded: load it (making room if need
        be); the job hears ``queued{loading:true}`` now and ``loading:false`` when the
        model is loaded."""
        if name in self._residency:
            return  # loaded, but retiring: its jobs wait until it is loaded again
        waiting = self._wanted.setdefault(name, {})
        if job in waiting:
            return
        waiting[job] = None
        self._scheduler.set_loading(job, True)
        self._plan()

    def _plan(self) -> None:
        """Start the loads (and the unloads that make room for them) that can start now."""
        for name in list(self._wanted):
            jobs = self._wanted[name]
            for job in [job for job in jobs if job.state is not JobState.QUEUED]:
                del jobs[job]
            if not jobs:
                del self._wanted[name]
                continue
            if name in self._loading or name in self._residency:
                continue
            if name in self._unloading:
                continue  # loaded again once that unload is done (it plans again)
            taken = len(self._residency) + len(self._loading) + len(self._unloading)
            if taken < self._residency.capacity:
                self._start(self._loading, name, self._load(name))
                continue
            keep = self._kept()
            victim = self._residency.victim(keep)
            if victim is not None:
                self._residency.remove(victim)
                # Room is being made: a model retired for it takes jobs again (it retires
                # again if room is still short once this unload is done).
                self._retiring = None
                self._start(self._unloading, victim, self._unload_to_make_room(victim))
                continue
            if self._retiring is None:
                self._retiring = self._residency.least_recently_used(keep)
                if self._retiring is None:
                    break  # room comes when a load or unload in progress is done
                logger.info(
                    "model %r takes no new jobs until it is unloaded to make room for %r",
                    self._retiring,
                    name,
                )
            break
        if not self._wanted and self._retiring is not None:
            logger.info("model %r takes jobs again", self._retiring)
            self._retiring = None
            self._scheduler.wake()

    def _kept(self) -> set[str]:
        """Models loaded for jobs that have not started yet: not unloaded meanwhile (a
        model unloaded before its jobs could start would be loaded again, forever)."""
        for name, jobs in list(self._loaded_for.items()):
            jobs[:] = [job for job in jobs if job.state is JobState.QUEUED]
            if not jobs:
                del self._loaded_for[name]
        return set(self._loaded_for)

    def _start(
        self,
        tasks: dict[str, asyncio.Task[None]],
        name: str,
        work: Coroutine[Any, Any, None],
    ) -> None:
        task = asyncio.create_task(work, name=f"model-{name}")
        tasks[name] = task

        def done(finished: asyncio.Task[None]) -> None:
            if tasks.get(name) is finished:
                del tasks[name]
            if not finished.cancelled():
                self._plan()
                self._scheduler.wake()

        task.add_done_callback(done)

    # ------------------------------------------------------------------ loading

    async def _load(self, name: str) -> None:
        spec = self._specs[name]
        logger.info("loading model %r (%s) on the loader thread", name, spec.spec)
        started = time.monotonic()
        try:
            model = await self.loader_thread.call(_load_with_one_thread, spec, self._config)
            await self._install(model, time.monotonic() - started)
        except Exception as exc:  # noqa: BLE001 - its jobs fail; the server goes on
            self.history.append(ModelEvent("load_failed", name, time.monotonic() - started))
            self._metrics.model_load_failures.labels(model=name).inc()
            jobs = list(self._wanted.pop(name, {}))
            logger.error(
                "could not load model %r: %s; ending its %d waiting jobs", name, exc, len(jobs)
            )
            for job in jobs:
                logger.info(
                    "session=%s job=%s failed: model %r not loaded", job.session_id, job.id, name
                )
                self._scheduler.end_waiting(
                    job,
                    Error(
                        id=job.id,
                        code=ErrorCode.GENERATION_FAILED,
                        message=f"generation failed: the model {name!r} could not be loaded: {exc}",
                    ),
                )
            return
        jobs = list(self._wanted.pop(name, {}))
        self._loaded_for[name] = jobs
        for job in jobs:
            self._scheduler.set_loading(job, False)

    async def _install(self, model: LoadedModel, seconds: float) -> None:
        """Make ``model``'s core on the engine thread; the model is resident from then."""
        name = model.name
        max_batch = self._max_batch

        def build() -> ModelFacts:
            self._cores[name] = EngineCore(model, max_batch=max_batch)
            return ModelFacts.of(model)

        facts = await self._thread.call(build)
        self.facts.setdefault(name, facts)
        self._residency.add(name)
        self._metrics.model_resident.labels(model=name).set(1)
        self._metrics.model_load_seconds.labels(model=name).set(seconds)
        self.history.append(ModelEvent("load", name, seconds))
        self._metrics.model_loads.labels(model=name).inc()
        logger.info(
            "model %r loaded in %.1f s (family %s, %s, %s)",
            name,
            seconds,
            model.family.name,
            model.device,
            str(model.dtype).removeprefix("torch."),
        )

    async def _unload_to_make_room(self, name: str) -> None:
        try:
            await self._unload(name)
        except Exception:
            logger.exception("unloading model %r failed", name)

    async def _unload(self, name: str) -> None:
        """Drop ``name``'s core and model on the engine thread; memory measured around."""
        self._residency.remove(name)

        def drop() -> tuple[int | None, int | None, str]:
            core = self._cores.pop(name)
            device = core.model.device
            before = memory_in_use(device)
            del core
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return before, memory_in_use(device), str(device)

        started = time.monotonic()
        before, after, device = await self._thread.call(drop)
        seconds = time.monotonic() - started
        self.history.append(ModelEvent("unload", name, seconds, before, after))
        self._metrics.model_resident.labels(model=name).set(0)
        self._metrics.model_unloads.labels(model=name).inc()
        logger.info(
            "model %r unloaded in %.2f s (%s memory in use: %s before, %s after)",
            name,
            seconds,
            device,
            _mib(before),
            _mib(after),
        )

    # ------------------------------------------------------------------ engine thread

    def add_all(self, specs: Sequence[JobSpec]) -> list[EngineEvent]:
        """Engine thread: each job to the core of its model."""
        events: list[EngineEvent] = []
        for spec in specs:
            events += self._cores[self.name_of(spec.request)].add(spec)
        return events

    def abort_all(self, keys: Sequence[Hashable]) -> list[EngineEvent]:
        """Engine thread: each job out of the core that runs it."""
        events: list[EngineEvent] = []
        for core in self._cores.values():
            events += core.abort_all([key for key in keys if key in core])
        return events

    def step(self) -> StepReport:
        """Engine thread: one step of the next busy core after the one that stepped last
        (each core steps its groups in turns): batches never mix models."""
        names = list(self._cores)
        if self._last_stepped in names:
            turn = names.index(self._last_stepped) + 1
            names = names[turn:] + names[:turn]
        for name in names:
            core = self._cores[name]
            if core.busy:
                self._last_stepped = name
                return core.step()
        return StepReport([], [], 0.0)

    async def close(self) -> None:
        """Stop loading: a load in progress finishes on its thread, unused, and the
        thread ends then (:meth:`join_loader`)."""
        for task in [*self._loading.values(), *self._unloading.values()]:
            task.cancel()
        if self._loader is not None:
            self._loader.close()

    def join_loader(self, timeout: float) -> bool:
        """Wait (blocking) for the loader thread to end after :meth:`close`; False if it
        is still inside a load after ``timeout``. True when there never was one."""
        return self._loader is None or self._loader.join(timeout)
