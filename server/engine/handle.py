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


class EngineLost(Exception):
    """The engine's process is gone (killed, out of memory, its machine lost).

    Its running jobs are lost with it; :meth:`EngineHandle.recover` waits until it is
    back (a Ray actor is restarted and loads its model again). The embedded engine never
    raises it: its failures are the server's own (see ``Server._engine_loop_ended``).
    """

    def __init__(self, engine: str, why: str) -> None:
        super().__init__(f"engine {engine} was lost" + (f": {why}" if why else ""))
        self.engine = engine
        self.why = why


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

    async def ping(self) -> None:
        """Check that an idle engine is there; raises :class:`EngineLost` when it is not."""
        ...

    async def recover(self) -> None:
        """After :class:`EngineLost`: until the engine answers again."""
        ...
