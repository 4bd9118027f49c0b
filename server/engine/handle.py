"""The front end's handle on one engine core, wherever the core runs.

An :class:`~.worker.EngineWorker` drives exactly one engine through this interface: the
three commands of :class:`~.core.EngineCore` as coroutines, plus the facts the front end
needs about the engine's model. :class:`~.local.LocalEngine` runs the core on this
process's engine thread; a Ray actor runs it in another process, on any machine.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Protocol

from .batching import BatchPolicy
from .events import EngineEvent, JobSpec, StepReport
from .facts import ModelFacts


class EngineHandle(Protocol):
    """One engine core, as its :class:`~.worker.EngineWorker` sees it.

    Calls come one at a time from one worker, each at a step boundary: ``add`` prepares
    jobs (phase 1), ``abort`` takes jobs out, ``step`` runs one step of one group.
    """

    #: For logs and metrics ("local", "ray-0", ...).
    name: str
    facts: ModelFacts
    policy: BatchPolicy

    async def add(self, specs: Sequence[JobSpec]) -> list[EngineEvent]: ...

    async def abort(self, keys: Sequence[Hashable]) -> list[EngineEvent]: ...

    async def step(self) -> StepReport: ...
