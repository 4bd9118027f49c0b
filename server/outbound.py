"""One session's outbound buffer: latest-wins for droppable messages, never a lost one.

Messages leave in the order they were put, with one exception that only ever removes:
a droppable message (``queued``, ``progress``, ``preview``) replaces the still-unsent one
of the same key (job id, type), and the new one goes to the back. Because the older one
is removed rather than overwritten in place, a job's steps still never decrease in what
the client sees. Droppable messages are built lazily, when the writer takes them: a
preview that a newer one replaces is never encoded at all.

Non-droppable messages are never dropped. Their count is bounded by the session (each
job has at most three), and the age of the oldest unsent one is what the send timeout
watches.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from pydantic import BaseModel

Build = Callable[[], BaseModel]


@dataclass(frozen=True)
class Outgoing:
    """A message waiting to be sent. ``build`` is called once, by the writer."""

    seq: int
    build: Build
    droppable: bool
    enqueued_at: float


class OutboundBuffer:
    """Bounded by construction: at most one droppable per key, and the caller limits the rest."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._entries: OrderedDict[int, Outgoing] = OrderedDict()
        self._latest: dict[Hashable, int] = {}
        self._keys: dict[int, Hashable] = {}
        # Non-droppable entries not yet confirmed sent, oldest first: (seq, enqueued_at).
        self._unsent_reliable: deque[tuple[int, float]] = deque()
        self._seq = itertools.count()
        self._readable = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._reliable_taken = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def reliable_backlog(self) -> int:
        """Non-droppable messages put but not yet confirmed sent."""
        return len(self._unsent_reliable)

    def put(self, message: BaseModel) -> None:
        """Queue a message that must reach the client."""
        if self._closed:
            return
        entry = Outgoing(next(self._seq), lambda: message, False, self._clock())
        self._entries[entry.seq] = entry
        self._unsent_reliable.append((entry.seq, entry.enqueued_at))
        self._wake()

    def put_latest(self, key: Hashable, build: Build) -> None:
        """Queue a droppable message, replacing the unsent one with the same key."""
        if self._closed:
            return
        previous = self._latest.pop(key, None)
        if previous is not None:
            del self._entries[previous]
            del self._keys[previous]
        entry = Outgoing(next(self._seq), build, True, self._clock())
        self._entries[entry.seq] = entry
        self._latest[key] = entry.seq
        self._keys[entry.seq] = key
        self._wake()

    async def get(self) -> Outgoing:
        """The oldest entry; call :meth:`sent` once it is written. Waits while empty."""
        while not self._entries:
            if self._closed:
                raise BufferClosed
            self._readable.clear()
            await self._readable.wait()
        _, entry = self._entries.popitem(last=False)
        key = self._keys.pop(entry.seq, None)
        if key is not None:
            del self._latest[key]
        return entry

    def sent(self, entry: Outgoing) -> None:
        """Confirm that ``entry`` was handed to the connection."""
        if not entry.droppable and self._unsent_reliable:
            if self._unsent_reliable[0][0] == entry.seq:
                self._unsent_reliable.popleft()
                self._reliable_taken.set()
        if not self._entries and not self._unsent_reliable:
            self._empty.set()

    def restart_clock(self) -> None:
        """Count the age of what waits from now (a resumed session's new connection)."""
        now = self._clock()
        self._unsent_reliable = deque((seq, now) for seq, _ in self._unsent_reliable)

    def oldest_unsent_age(self) -> float:
        """Seconds the oldest non-droppable message has waited (0 when none waits)."""
        if not self._unsent_reliable:
            return 0.0
        return self._clock() - self._unsent_reliable[0][1]

    async def wait_backlog_below(self, limit: int) -> None:
        """Until fewer than ``limit`` non-droppable messages wait (or the buffer closes)."""
        while len(self._unsent_reliable) >= limit and not self._closed:
            self._reliable_taken.clear()
            await self._reliable_taken.wait()

    async def wait_empty(self) -> None:
        """Until everything put so far has been sent."""
        await self._empty.wait()

    def close(self) -> None:
        """Refuse further messages and wake the writer; what is queued is discarded."""
        self._closed = True
        self._entries.clear()
        self._latest.clear()
        self._keys.clear()
        self._unsent_reliable.clear()
        self._empty.set()
        self._readable.set()
        self._reliable_taken.set()

    def _wake(self) -> None:
        self._empty.clear()
        self._readable.set()


class BufferClosed(Exception):
    """The buffer was closed while a writer waited on it."""
