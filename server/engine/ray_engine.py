"""Engine cores in Ray actors: one per GPU (or CPU slot), on any machine of a cluster.

Needs the ``latentcast[ray]`` extra; nothing else in the server imports this module.

* :class:`EngineActor` runs in the actor's process: it loads the model exactly as the
  embedded engine does (``ServerConfig.model_arguments``), holds an
  :class:`~.core.EngineCore` and answers the three commands on the process's main thread
  (where torch's OpenMP threads serve it best). Finished images are encoded there, so
  the front end only forwards bytes.
* :class:`RayEngine` is the front end's :class:`~.handle.EngineHandle` on one actor. A
  call to an actor that died (killed, out of memory, node lost) raises
  :class:`~.handle.EngineLost`; Ray restarts the actor (it reloads the model) and
  :meth:`RayEngine.recover` waits for it.
* :class:`RayRuntime` joins the cluster given by ``--ray-address`` or starts a local
  Ray runtime, and stops only one it started.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Hashable, Sequence
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError, RayActorError

from ..config import ServerConfig
from .batching import BatchPolicy, default_max_batch
from .events import EngineEvent, JobFailed, JobFinished, JobSpec, JobStopped, StepReport
from .facts import ModelFacts
from .handle import EngineLost

logger = logging.getLogger("latentcast.engine")

#: How long a restarted actor may take to load its model again before the worker asks
#: again (it keeps asking: an engine comes back whenever Ray manages to restart it).
RECOVER_POLL_SECONDS = 1.0


class EngineActor:
    """One engine core in a Ray actor process. Ray runs its methods one at a time."""

    def __init__(self, config: ServerConfig) -> None:
        import torch

        from ..models import load_model
        from .core import EngineCore

        logging.basicConfig(level=config.log_level.upper(), format="%(name)s: %(message)s")
        arguments = config.model_arguments()
        if config.device.startswith("cuda"):
            # Ray shows an actor only its own GPU, as cuda:0, whatever --device names.
            arguments["device"] = "cuda"
        default = config.default_model
        model = load_model(default.spec, name=default.name, **arguments)
        if model.device.type == "cpu":
            # Ray gives an actor OMP_NUM_THREADS = its CPUs, so torch's default fits.
            torch.set_num_threads(config.cpu_threads or torch.get_num_threads())
        self._max_batch = config.max_batch or default_max_batch(model.device.type)
        self._core = EngineCore(model, max_batch=self._max_batch)
        self._facts = ModelFacts.of(model)
        self._requests: dict[Hashable, Any] = {}

    def describe(self) -> tuple[ModelFacts, int, int]:
        """(model facts, max_batch, process id)."""
        return self._facts, self._max_batch, os.getpid()

    def ping(self) -> int:
        """The process id: the actor answers (an idle engine's health check)."""
        return os.getpid()

    def add(self, specs: list[JobSpec]) -> list[EngineEvent]:
        self._requests.update((spec.key, spec.request) for spec in specs)
        return self._outgoing(self._core.add_all(specs))

    def abort(self, keys: list[Hashable]) -> list[EngineEvent]:
        return self._outgoing(self._core.abort_all(keys))

    def step(self) -> StepReport:
        report = self._core.step()
        return StepReport(self._outgoing(report.events), report.unet_rows, report.seconds)

    def _outgoing(self, events: list[EngineEvent]) -> list[EngineEvent]:
        """Finished images encoded as their jobs asked; ended jobs forgotten."""
        from .worker import encode_results

        out: list[EngineEvent] = []
        for event in events:
            if isinstance(event, JobFinished):
                request = self._requests.pop(event.key)
                try:
                    results = encode_results(event.images, request.output, request.seed)
                except Exception as exc:  # this job fails, the engine goes on
                    logger.exception("job %s: encoding failed", event.key)
                    event = JobFailed(event.key, f"encoding failed: {exc}")
                else:
                    event = JobFinished(event.key, images=[], results=results)
            elif isinstance(event, JobStopped | JobFailed):
                self._requests.pop(event.key, None)
            out.append(event)
        return out


class RayEngine:
    """The front end's handle on one :class:`EngineActor`."""

    def __init__(self, name: str, actor: Any, facts: ModelFacts, max_batch: int, pid: int):
        self.name = name
        self.facts = facts
        self.policy = BatchPolicy(max_batch)
        #: The actor's process (it changes when Ray restarts the actor).
        self.pid = pid
        self._actor = actor

    @classmethod
    async def start(cls, name: str, config: ServerConfig, *, gpus: float) -> RayEngine:
        """Create the actor and wait until its model is loaded.

        Raises:
            RuntimeError: the actor could not load the model (the message says why); the
                actor is ended, not restarted.
        """
        actor_class = ray.remote(EngineActor)
        actor = actor_class.options(
            name=None,
            num_gpus=gpus,
            num_cpus=0 if gpus else 1,
            max_restarts=-1,
            max_task_retries=0,
        ).remote(config)
        try:
            described = await _call(name, actor.describe.remote())
        except EngineLost as lost:
            ray.kill(actor, no_restart=True)  # not restarted to fail the same way again
            raise RuntimeError(f"engine {name} could not start: {lost.why}") from lost
        engine = cls(name, actor, *described)
        logger.info(
            "engine %s ready: model %s on %s (pid %d)",
            name,
            engine.facts.name,
            engine.facts.device,
            engine.pid,
        )
        return engine

    async def add(self, specs: Sequence[JobSpec]) -> list[EngineEvent]:
        events: list[EngineEvent] = await _call(self.name, self._actor.add.remote(list(specs)))
        return events

    async def abort(self, keys: Sequence[Hashable]) -> list[EngineEvent]:
        events: list[EngineEvent] = await _call(self.name, self._actor.abort.remote(list(keys)))
        return events

    async def step(self) -> StepReport:
        report: StepReport = await _call(self.name, self._actor.step.remote())
        return report

    async def ping(self) -> None:
        """Raises :class:`EngineLost` when the actor is gone."""
        self.pid = await _call(self.name, self._actor.ping.remote())

    async def recover(self) -> None:
        """Until the actor answers again (Ray restarts it, and it reloads the model).

        Each new reason it does not answer is logged once: a restarted actor that could
        not load the model says why, and then stays quiet (Ray does not restart an actor
        whose constructor raised: it stays lost).
        """
        said = ""
        while True:
            try:
                _facts, _max_batch, self.pid = await _call(self.name, self._actor.describe.remote())
                logger.info("engine %s is back (pid %d)", self.name, self.pid)
                return
            except EngineLost as lost:
                if lost.why != said:
                    logger.warning("engine %s is not back: %s", self.name, lost.why)
                    said = lost.why
                await asyncio.sleep(RECOVER_POLL_SECONDS)

    def kill(self) -> None:
        """End the actor for good (no restart)."""
        ray.kill(self._actor, no_restart=True)


async def _call(name: str, ref: Any) -> Any:
    try:
        return await ref
    except (RayActorError, ActorUnavailableError) as exc:
        raise EngineLost(name, _why(exc)) from exc


def _why(exc: Exception) -> str:
    """One line that says why an actor is gone: for an actor whose constructor raised
    (the model did not load), that exception, the last line of Ray's traceback."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return type(exc).__name__
    return lines[-1] if "creation task" in lines[0] else lines[0]


class RayRuntime:
    """The Ray cluster the engines live on: joined (``--ray-address``) or started here."""

    def __init__(self, config: ServerConfig) -> None:
        self._config = config
        self.started_here = config.ray_address is None

    def start(self) -> None:
        """Connect (blocking: call it off the event loop)."""
        config = self._config
        options: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": logging.WARNING,
            "log_to_driver": config.log_level == "debug",
        }
        if config.ray_address is not None:
            ray.init(address=config.ray_address, **options)
        else:
            # Enough CPU slots for every engine on a CPU device; GPUs as Ray finds them.
            cpus = max(os.cpu_count() or 1, config.ray_engines)
            ray.init(address="local", num_cpus=cpus, **options)
        context = ray.get_runtime_context()
        logger.info(
            "ray: %s (GCS %s, session %s), resources %s",
            "started a local runtime" if self.started_here else f"joined {config.ray_address}",
            context.gcs_address,
            context.get_session_name(),
            ray.cluster_resources(),
        )

    def gpus_per_engine(self) -> float:
        """1 on a cluster with GPUs (or a CUDA device asked for), else 0."""
        device = self._config.device
        if device == "cpu":
            return 0
        if device.startswith("cuda"):
            return 1
        return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0

    def stop(self) -> None:
        """Disconnect; a runtime started here is shut down with it."""
        if ray.is_initialized():
            ray.shutdown()
