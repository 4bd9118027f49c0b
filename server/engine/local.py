"""The embedded engine: one :class:`~.core.EngineCore` per loaded model, on this
process's engine thread (:class:`~.models.ModelSet` holds them)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from .batching import BatchPolicy
from .events import EngineEvent, JobSpec, StepReport
from .facts import ModelFacts
from .models import ModelSet
from .thread import EngineThread


class LocalEngine:
    """An :class:`~.handle.EngineHandle` whose cores run on an :class:`EngineThread`.

    Every command is one hand-off to that thread, whatever the batch holds; each job goes
    to the core of its model, and one step is one step of one core (cores take turns).
    """

    name = "local"

    def __init__(self, thread: EngineThread, models: ModelSet, max_batch: int) -> None:
        self.models = models
        self.policy = BatchPolicy(max_batch)
        self._thread = thread

    @property
    def facts(self) -> ModelFacts:
        """The default model's facts."""
        return self.models.facts_of(self.models.default)

    @classmethod
    async def start(cls, thread: EngineThread, models: ModelSet, max_batch: int) -> LocalEngine:
        """Load the models (:meth:`ModelSet.start`) and serve them on ``thread``."""
        await models.start(max_batch)
        return cls(thread, models, max_batch)

    async def add(self, specs: Sequence[JobSpec]) -> list[EngineEvent]:
        return await self._thread.call(self.models.add_all, list(specs))

    async def abort(self, keys: Sequence[Hashable]) -> list[EngineEvent]:
        return await self._thread.call(self.models.abort_all, list(keys))

    async def step(self) -> StepReport:
        return await self._thread.call(self.models.step)

    async def ping(self) -> None:
        """Nothing to check: the engine thread is this process's."""

    async def recover(self) -> None:
        """Never needed: the embedded engine does not raise ``EngineLost``."""
