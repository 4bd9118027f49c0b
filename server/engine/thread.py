"""The engine thread: the one thread that touches the model."""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")


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
            # Not kept while waiting for the next call: a result (a loaded model) or an
            # argument (a model being dropped) would live on here.
            del item, fn, future
