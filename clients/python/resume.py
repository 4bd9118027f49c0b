"""What the client needs to resume a session (PROTOCOL.md section 2a), without I/O.

:class:`SeqTracker` remembers the last ``seq`` processed and drops a message seen before
(a resume sends again what the server kept after the ``after`` it was given);
:func:`resume_url` builds the URL of a resume; :func:`retry_delays` is the back-off;
:func:`may_resume` says which ends of a connection are worth a resume.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: Tries to take a session over again after the connection is lost.
RESUME_TRIES = 5
#: Wait before the second try; it doubles for each try after (0.2, 0.4, 0.8, 1.6 s).
RESUME_BACKOFF = 0.2
#: Close codes with which a server ends a connection on purpose: no resume then. 1000 and
#: 1001 (shutting down, or the session was resumed on another connection), 1008 (policy:
#: too many bad frames, or a client that did not read).
DELIBERATE_CLOSE_CODES = frozenset({1000, 1001, 1008})


class SeqTracker:
    """The last seq processed on a resumable session."""

    def __init__(self) -> None:
        self.last = 0

    def fresh(self, seq: int | None) -> bool:
        """True for a message to process (and remember); False for one seen before.

        Messages without a seq (``welcome``, any message of a session that is not
        resumable) are always fresh.
        """
        if seq is None:
            return True
        if seq <= self.last:
            return False
        self.last = seq
        return True


def with_query(url: str, **params: str) -> str:
    """``url`` with ``params`` set in its query (other parameters kept)."""
    parts = urlsplit(url)
    query = [(key, value) for key, value in parse_qsl(parts.query) if key not in params]
    query.extend(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def resume_url(url: str, token: str, after: int) -> str:
    """The URL that takes the session of ``token`` over, after seq ``after``."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("resumable", "resume")]
    query.extend([("resume", token), ("after", str(after))])
    return urlunsplit(parts._replace(query=urlencode(query)))


def retry_delays(tries: int = RESUME_TRIES, backoff: float = RESUME_BACKOFF) -> list[float]:
    """Seconds to wait before each try: the first at once, then ``backoff`` doubling."""
    return [0.0 if index == 0 else backoff * 2 ** (index - 1) for index in range(tries)]


def may_resume(close_code: int | None) -> bool:
    """Whether a connection that ended with ``close_code`` (None or 1006: no close frame)
    is worth a resume."""
    return close_code not in DELIBERATE_CLOSE_CODES
