"""The Python client's one exception tree.

::

    LatentcastError                 anything this client raises on purpose
     ├── ConnectFailed              no session: unreachable, refused, not a latentcast server
     │    ├── AuthenticationFailed  HTTP 401: a token is needed, or this one is wrong
     │    └── ServerUnavailable     HTTP 503: loading, draining, or at its connection limit
     ├── RequestRejected            a submit answered with ``error`` (the job never existed)
     ├── JobCancelled               the job ended with ``cancelled`` (client, replaced, ...)
     ├── JobFailed                  the job ended with ``error`` (generation_failed, shutdown)
     └── ConnectionLost             the connection closed before the job (or submit) ended

Programs act on the ``code`` attributes (the protocol's error codes), not on messages.
"""

from __future__ import annotations


class LatentcastError(Exception):
    """Base class of every error the latentcast client raises on purpose."""


class ConnectFailed(LatentcastError):
    """A session could not be opened.

    ``status`` is the HTTP status of a refused WebSocket upgrade, or ``None`` when the
    server could not be reached at all or did not speak protocol v1.

    ``reason`` says why, where the client can tell: ``"refused"`` (nothing listens at
    that host and port), ``"timeout"`` (no answer in time), ``"not_found"`` (HTTP 404:
    no WebSocket endpoint at that path; latentcast's is ``/v1/ws``), ``"unauthorized"``
    (HTTP 401), and for :class:`ServerUnavailable` ``"loading"``, ``"draining"`` or
    ``"connection_limit"``; otherwise ``None``.
    """

    def __init__(
        self,
        message: str,
        *,
        url: str,
        status: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        self.status = status
        self.reason = reason


class AuthenticationFailed(ConnectFailed):
    """HTTP 401: the server needs a bearer token and none or a wrong one was given."""


class ServerUnavailable(ConnectFailed):
    """HTTP 503: the server is loading its model, draining, or at its connection limit.

    ``reason`` is ``"loading"`` (try again in a moment), ``"draining"`` (shutting down)
    or ``"connection_limit"``, from the server's answer; ``None`` when it did not say.
    """


class RequestRejected(LatentcastError):
    """A submit was answered with ``error``: the job was never accepted.

    ``code`` is the protocol's error code (``invalid_request``, ``queue_full``, ...) and
    ``field`` the dotted path of the offending field for ``invalid_request``. ``local`` is
    true when this client refused the request itself, with the same rules and answer the
    server would have given, without sending it.
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        job_id: str | None = None,
        local: bool = False,
    ) -> None:
        where = f" [{field}]" if field else ""
        super().__init__(f"{code}{where}: {message}")
        self.code = code
        self.message = message
        self.field = field
        self.job_id = job_id
        self.local = local


class JobCancelled(LatentcastError):
    """The job ended with ``cancelled``; ``reason`` is client, replaced or disconnect."""

    def __init__(self, job_id: str, reason: str, step: int) -> None:
        super().__init__(f"job {job_id!r} was cancelled ({reason}) after {step} steps")
        self.job_id = job_id
        self.reason = reason
        self.step = step


class JobFailed(LatentcastError):
    """The job ended with ``error``: ``code`` is generation_failed, shutdown or internal."""

    def __init__(self, job_id: str, code: str, message: str) -> None:
        super().__init__(f"job {job_id!r} failed: {code}: {message}")
        self.job_id = job_id
        self.code = code
        self.message = message


class ConnectionLost(LatentcastError):
    """The connection ended while a job (or a submit's answer) was still outstanding.

    ``code`` and ``reason`` are the WebSocket close code and reason when a close frame
    was exchanged (1001 when the server shut down), else ``None`` and "".
    """

    def __init__(self, message: str, *, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason
