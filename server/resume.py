"""Resumable sessions (PROTOCOL.md section 2a): the replay log and the registry of tokens.

A session asked for with ``?resumable=1`` outlives its connection. Two pieces make that
possible, both without I/O of their own:

* :class:`ReplayLog`, one per resumable session, is where the session's writer stamps each
  message with its ``seq`` (the moment it takes the message from the outbound buffer to
  write it, so a droppable message coalesced away never uses a number) and keeps what a
  resume may have to send again: every non-droppable message written in the last
  ``--resume-window`` seconds, as the exact frame written, and the latest droppable
  message of each kind per unfinished job.
* :class:`ResumeRegistry`, one per server, maps resume tokens to sessions and holds the
  expiry timer of each detached session (one whose connection is gone). A token is a
  secret of 192 bits; the registry finds it by its SHA-256 digest and compares the token
  itself in constant time. Tokens are never logged: :func:`token_tag` (a short prefix of
  the digest) is what logs show.

Memory: the log keeps non-droppable frames for at most the window and at most
``max_bytes`` (the server passes ``max_jobs_per_session`` results of the largest size its
limits allow, see :func:`replay_log_bytes`); older ones are forgotten first, and the log
remembers the newest ``seq`` it forgot, so that a resume which would need it is refused
(a new session, ``resumed:false``) rather than served with a gap.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel

from latentcast.protocol import TERMINAL_ERROR_CODES, TERMINAL_TYPES, encode_message

from .metrics import Metrics

logger = logging.getLogger("latentcast.resume")

#: Bytes of randomness in a resume token (192 bits; PROTOCOL.md asks for at least 128).
TOKEN_BYTES = 24
#: Droppable kinds, in the order a resume sends a job's latest state.
DROPPABLE_KINDS = ("queued", "progress", "preview")


def token_tag(token: str) -> str:
    """What logs show of a token: 8 hex digits of its SHA-256, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


def replay_log_bytes(max_jobs_per_session: int, largest_result_bytes: int) -> int:
    """The bound on one session's replay log: as many of the largest results as the
    session may have unfinished jobs."""
    return max_jobs_per_session * largest_result_bytes


# --------------------------------------------------------------------------- the request


@dataclass(frozen=True)
class ResumeRequest:
    """What the upgrade's query asks for.

    ``resumable``: ``?resumable=1`` (any other value: not resumable). ``token``: the
    ``resume`` parameter. ``after``: the ``after`` parameter; absent means 0, and a value
    that is not a decimal integer >= 0 is None (the resume then gives a new session).
    """

    resumable: bool = False
    token: str | None = None
    after: int | None = 0

    @classmethod
    def from_path(cls, path: str) -> ResumeRequest:
        return cls.from_query(urlsplit(path).query)

    @classmethod
    def from_query(cls, text: str) -> ResumeRequest:
        query = parse_qs(text, keep_blank_values=True)
        token = query.get("resume", [None])[0]
        after_values = query.get("after")
        after: int | None = 0
        if after_values is not None:
            text = after_values[0]
            after = int(text) if text.isascii() and text.isdecimal() else None
        return cls(
            resumable=query.get("resumable", [""])[0] == "1",
            token=token or None,
            after=after,
        )


# --------------------------------------------------------------------------- the log


@dataclass(frozen=True)
class _Kept:
    seq: int
    frame: bytes
    written_at: float


class ReplayLog:
    """One resumable session's ``seq`` counter and what a resume may send again.

    Not thread-safe and synchronous: the session's writer calls :meth:`write` for every
    message after ``welcome``; a resume calls :meth:`covers`, :meth:`replay` and
    :meth:`droppable_state`.
    """

    def __init__(
        self, *, window: float, max_bytes: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = window
        self._max_bytes = max_bytes
        self._clock = clock
        self._kept: deque[_Kept] = deque()
        self._kept_bytes = 0
        self._last_seq = 0
        #: The newest seq of a non-droppable message no longer kept (0: none forgotten).
        self._forgotten_up_to = 0
        #: job id -> kind -> the latest droppable message written (with its seq).
        self._latest: dict[str, dict[str, BaseModel]] = {}

    @property
    def last_seq(self) -> int:
        """The seq of the last message written (0 before the first)."""
        return self._last_seq

    @property
    def kept_bytes(self) -> int:
        return self._kept_bytes

    def __len__(self) -> int:
        """Non-droppable messages kept."""
        return len(self._kept)

    def write(self, message: BaseModel, *, droppable: bool) -> bytes:
        """Stamp ``message`` with the next seq and return its frame; keep what must be."""
        if "seq" not in type(message).model_fields:
            # Every server message derives from protocol.messages._ServerMessage.
            raise TypeError(f"{type(message).__name__} has no seq field")
        self._last_seq += 1
        stamped = message.model_copy(update={"seq": self._last_seq})
        frame = encode_message(stamped)
        job_id = getattr(message, "id", None)
        kind = str(getattr(message, "type", ""))
        if droppable:
            if isinstance(job_id, str):
                self._latest.setdefault(job_id, {})[kind] = stamped
            return frame
        self._kept.append(_Kept(self._last_seq, frame, self._clock()))
        self._kept_bytes += len(frame)
        if isinstance(job_id, str):
            if kind == "started":
                self._latest.get(job_id, {}).pop("queued", None)
            elif _is_terminal(message):
                self._latest.pop(job_id, None)
        self._forget_old()
        return frame

    def covers(self, after: int) -> bool:
        """Whether a resume after ``after`` can be served without a gap: ``after`` is a seq
        this session has written (or 0) and nothing newer than it was forgotten."""
        self._forget_old()
        return 0 <= after <= self._last_seq and after >= self._forgotten_up_to

    def replay(self, after: int) -> list[bytes]:
        """The kept non-droppable frames with a seq greater than ``after``, in order."""
        self._forget_old()
        return [kept.frame for kept in self._kept if kept.seq > after]

    def droppable_state(self, unfinished: Collection[str], after: int) -> list[BaseModel]:
        """The latest droppable message of each kind of each job in ``unfinished`` that the
        client has not processed (seq > ``after``), without its seq: to be written again
        with a fresh one. Jobs in the order of their first droppable message."""
        state: list[BaseModel] = []
        for job_id, kinds in self._latest.items():
            if job_id not in unfinished:
                continue
            for kind in DROPPABLE_KINDS:
                message = kinds.get(kind)
                seq = getattr(message, "seq", None)
                if message is not None and isinstance(seq, int) and seq > after:
                    state.append(message.model_copy(update={"seq": None}))
        return state

    def _forget_old(self) -> None:
        oldest_allowed = self._clock() - self._window
        while self._kept and (
            self._kept[0].written_at < oldest_allowed or self._kept_bytes > self._max_bytes
        ):
            kept = self._kept.popleft()
            self._kept_bytes -= len(kept.frame)
            self._forgotten_up_to = kept.seq


def _is_terminal(message: BaseModel) -> bool:
    kind = getattr(message, "type", None)
    if kind == "error":
        return getattr(message, "code", None) in TERMINAL_ERROR_CODES
    return kind in TERMINAL_TYPES


# --------------------------------------------------------------------------- the registry


class Resumable(Protocol):
    """The session side of the registry."""

    @property
    def id(self) -> str: ...

    def expire(self) -> None:
        """The resume window passed while detached: end the session."""


SessionT = TypeVar("SessionT", bound=Resumable)


@dataclass
class _Entry(Generic[SessionT]):
    token: str
    session: SessionT


class ResumeRegistry(Generic[SessionT]):
    """Resume tokens -> sessions, and the expiry timers of detached sessions."""

    def __init__(self, *, window: float, metrics: Metrics) -> None:
        self.window = window
        self._metrics = metrics
        self._by_digest: dict[bytes, _Entry[SessionT]] = {}
        self._digest_of: dict[str, bytes] = {}  # session id -> its current token's digest
        self._timers: dict[str, tuple[SessionT, asyncio.TimerHandle]] = {}

    def issue(self, session: SessionT) -> str:
        """A fresh token for ``session``; the one it had before is void."""
        self._void(session.id)
        token = secrets.token_urlsafe(TOKEN_BYTES)
        digest = _digest(token)
        self._by_digest[digest] = _Entry(token, session)
        self._digest_of[session.id] = digest
        return token

    def valid(self, token: str) -> bool:
        """Whether ``token`` would take a session over now (nothing is consumed)."""
        return self._find(token) is not None

    def claim(self, token: str) -> SessionT | None:
        """The session of ``token``, whose token is now void and whose expiry is off;
        None for a token that is unknown or void."""
        entry = self._find(token)
        if entry is None:
            logger.info("resume refused: token %s is unknown or void", token_tag(token))
            return None
        self._void(entry.session.id)
        self._cancel_timer(entry.session.id)
        return entry.session

    def detached(self, session: SessionT) -> None:
        """``session`` lost its connection: it ends unless resumed within the window."""
        self._cancel_timer(session.id)
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.window, self._expire, session)
        self._timers[session.id] = (session, timer)
        logger.info("session=%s detached: resumable for %g s", session.id, self.window)

    def attached(self, session: SessionT) -> None:
        """``session`` has a connection again: no expiry while it keeps it."""
        self._cancel_timer(session.id)

    def forget(self, session: SessionT) -> None:
        """``session`` ended: its token is void and no timer is left."""
        self._void(session.id)
        self._cancel_timer(session.id)

    def detached_sessions(self) -> list[SessionT]:
        return [session for session, _ in self._timers.values()]

    def close(self) -> None:
        """End every detached session now (the server is going away)."""
        for session, timer in list(self._timers.values()):
            timer.cancel()
            session.expire()
        self._timers.clear()

    def _expire(self, session: SessionT) -> None:
        self._timers.pop(session.id, None)
        self._void(session.id)
        self._metrics.resume_expiries.inc()
        logger.info("session=%s was not resumed within %g s: ending it", session.id, self.window)
        session.expire()

    def _find(self, token: str) -> _Entry[SessionT] | None:
        entry = self._by_digest.get(_digest(token))
        if entry is None or not hmac.compare_digest(entry.token.encode(), token.encode()):
            return None
        return entry

    def _void(self, session_id: str) -> None:
        digest = self._digest_of.pop(session_id, None)
        if digest is not None:
            self._by_digest.pop(digest, None)

    def _cancel_timer(self, session_id: str) -> bool:
        held = self._timers.pop(session_id, None)
        if held is None:
            return False
        held[1].cancel()
        return True


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
