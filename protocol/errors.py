"""Error codes of protocol v1 and the protocol's one exception tree.

::

    ProtocolError            a client message the protocol itself rejects
     ├── BadFrame            not one MessagePack map with a string ``type`` (id is always nil)
     ├── UnknownType         a ``type`` this protocol does not define
     └── InvalidRequest      a field missing, unknown, of the wrong type or out of range

Every exception carries what the server needs to answer with an ``error`` message: the
error ``code``, a human-readable ``message``, the offending message's ``id`` when that
was a string, and for :class:`InvalidRequest` the dotted ``field`` path.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """The ``code`` of an ``error`` message (PROTOCOL.md section 6)."""

    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_REQUEST = "invalid_request"
    DUPLICATE_ID = "duplicate_id"
    UNKNOWN_JOB = "unknown_job"
    UNSUPPORTED = "unsupported"
    BAD_IMAGE = "bad_image"
    QUEUE_FULL = "queue_full"
    TOO_MANY_JOBS = "too_many_jobs"
    DRAINING = "draining"
    GENERATION_FAILED = "generation_failed"
    SHUTDOWN = "shutdown"
    INTERNAL = "internal"


#: Codes of an ``error`` that ends an accepted job (its terminal message). Every other code
#: answers a client message: an ``error{code:"duplicate_id", id:"a"}`` says that a new
#: submit was refused, not that the unfinished job "a" ended.
TERMINAL_ERROR_CODES = frozenset(
    {ErrorCode.GENERATION_FAILED, ErrorCode.SHUTDOWN, ErrorCode.INTERNAL}
)

#: Codes that count toward a connection's ``limits.max_bad_frames``.
FRAME_ERROR_CODES = frozenset({ErrorCode.BAD_FRAME, ErrorCode.UNKNOWN_TYPE})


#: The most characters of a client's value that an error message quotes.
QUOTE_LIMIT = 64


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``repr(text)``, cut to about ``limit`` characters: error messages quote what a client
    sent, and what a client sends can be as long as a frame."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


class ProtocolError(Exception):
    """A client message that the protocol rejects before any server logic sees it."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, *, id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.id = id

    @property
    def field(self) -> str | None:
        return None


class BadFrame(ProtocolError):
    """Not exactly one MessagePack map with string keys and a string ``type``."""

    code = ErrorCode.BAD_FRAME

    def __init__(self, message: str) -> None:
        super().__init__(message, id=None)


class UnknownType(ProtocolError):
    """A well-formed map whose ``type`` this protocol does not define."""

    code = ErrorCode.UNKNOWN_TYPE


class InvalidRequest(ProtocolError):
    """A known message with a field missing, unknown, mistyped or out of range."""

    code = ErrorCode.INVALID_REQUEST

    def __init__(
        self,
        message: str,
        *,
        field: str,
        id: str | None = None,
        message_type: str | None = None,
    ) -> None:
        super().__init__(message, id=id)
        self._field = field
        #: The ``type`` of the rejected message (``"submit"``, ``"cancel"``), when known: a
        #: server counts a rejected submit as a rejected job.
        self.message_type = message_type

    @property
    def field(self) -> str:
        return self._field
