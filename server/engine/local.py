"""The embedded engine: an :class:`~.core.EngineCore` on this process's engine thread."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from ..models import LoadedModel
from .batching import BatchPolicy
from .core import EngineCore
from .events import EngineEvent, JobSpec, StepReport
from .facts import ModelFacts
from .thread import EngineThread


class LocalEngine:
    """An :class:`~.handle.EngineHandle` whose core runs on an :class:`EngineThread`.

    Every command is one hand-off to that thread, whatever the batch holds.
    """

    name = "local"

    def __init__(self, thread: EngineThread, core: EngineCore, facts: ModelFacts) -> None:
        self.facts = facts
        self.policy: BatchPolicy = core.policy
        self._thread = thread
        self._core = core

    @classmethod
    async def start(cls, thread: EngineThread, model: LoadedModel, max_batch: int) -> LocalEngine:
        """A core for ``model`` (already loaded on ``thread``), made on that thread."""

        def build() -> tuple[EngineCore, ModelFacts]:
            return EngineCore(model, max_batch=max_batch), ModelFacts.of(model)

        core, facts = await thread.call(build)
        return cls(thread, core, facts)

    async def add(self, specs: Sequence[JobSpec]) -> list[EngineEvent]:
        return await self._thread.call(self._core.add_all, list(specs))

    async def abort(self, keys: Sequence[Hashable]) -> list[EngineEvent]:
        return await self._thread.call(self._core.abort_all, list(keys))

    async def step(self) -> StepReport:
        return await self._thread.call(self._core.step)

    async def ping(self) -> None:
        """Nothing to check: the engine thread is this process's."""

    async def recover(self) -> None:
        """Never needed: the embedded engine does not raise ``EngineLost``."""
