"""What happens before a WebSocket exists: HTTP endpoints and the handshake's checks.

``process_request`` of the websockets server lands here for every HTTP request on the
port. It answers GET /health, /ready, /metrics and / itself, and for /v1/ws runs the
checks of PROTOCOL.md section 1 in order: 401 (token), 403 (origin), 503 (loading,
draining or at the connection limit). Returning None lets the upgrade go ahead.
"""

from __future__ import annotations

import hmac
import http
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .config import ServerConfig
from .metrics import CONTENT_TYPE, Metrics
from .resume import ResumeRequest

logger = logging.getLogger("latentcast.transport")

WS_PATH = "/v1/ws"


@dataclass(frozen=True)
class ServerStatus:
    """What the HTTP side needs to know about the server, read at each request."""

    ready: bool
    reason: str | None  # "loading" | "draining" | "no engines" when not ready
    at_connection_limit: bool


class HttpFront:
    def __init__(
        self,
        config: ServerConfig,
        metrics: Metrics,
        status: Callable[[], ServerStatus],
        *,
        can_resume: Callable[[str], bool] | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._status = status
        #: Whether a resume token would take a session over: such a resume is let
        #: through while draining (PROTOCOL.md 2a, docs/protocol.md).
        self._can_resume = can_resume
        self._tokens = tuple(token.encode() for token in config.tokens)

    def __call__(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        path = url.path
        if path == WS_PATH:
            return self._handshake(request, url.query)
        if path == "/health":
            return _json(http.HTTPStatus.OK, {"status": "ok"})
        if path == "/ready":
            status = self._status()
            if status.ready:
                return _json(http.HTTPStatus.OK, {"ready": True})
            return _json(
                http.HTTPStatus.SERVICE_UNAVAILABLE, {"ready": False, "reason": status.reason}
            )
        if path == "/metrics":
            if not self._authorized(request, url.query):
                return _unauthorized()
            return _response(http.HTTPStatus.OK, CONTENT_TYPE, self._metrics.render())
        static = _static_file("index.html" if path == "/" else path[1:])
        if static is not None:
            return static
        return _response(http.HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n")

    def _handshake(self, request: Request, query: str) -> Response | None:
        if not self._authorized(request, query):
            logger.info("handshake refused: missing or wrong token")
            return _unauthorized()
        origin = request.headers.get("Origin")
        allowed = self._config.allow_origins
        if allowed and origin is not None and origin not in allowed:
            logger.info("handshake refused: origin %r is not allowed", origin)
            return _response(
                http.HTTPStatus.FORBIDDEN, "text/plain; charset=utf-8", b"origin not allowed\n"
            )
        status = self._status()
        if (
            not status.ready
            and status.reason == "draining"
            and not status.at_connection_limit
            and self._resumes_now(query)
        ):
            return None  # a resume during the drain: its jobs' last messages wait for it
        if not status.ready or status.at_connection_limit:
            reason = status.reason or "the connection limit is reached"
            return _response(
                http.HTTPStatus.SERVICE_UNAVAILABLE,
                "text/plain; charset=utf-8",
                f"unavailable: {reason}\n".encode(),
                retry_after=True,
            )
        return None

    def _resumes_now(self, query: str) -> bool:
        token = ResumeRequest.from_query(query).token
        return self._can_resume is not None and token is not None and self._can_resume(token)

    def _authorized(self, request: Request, query: str) -> bool:
        if not self._tokens:
            return True
        presented: list[bytes] = []
        header = request.headers.get("Authorization")
        if header is not None:
            scheme, _, credentials = header.partition(" ")
            if scheme.lower() == "bearer":
                presented.append(credentials.strip().encode())
        presented.extend(value.encode() for value in parse_qs(query).get("token", []))
        # Compare against every configured token, without stopping early.
        matched = False
        for candidate in presented:
            for token in self._tokens:
                matched |= hmac.compare_digest(candidate, token)
        return matched


# The browser client's built assets (clients/web -> server/static), served at the root.
# A name is one path segment of safe characters with one of these suffixes, looked up
# directly inside the static folder: no slashes, no "..", no hidden files.
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
_STATIC_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,99}")


def _static_file(name: str) -> Response | None:
    """The asset ``name`` from server/static, or None when there is no such asset."""
    suffix = name[name.rfind(".") :] if "." in name else ""
    if suffix not in _STATIC_TYPES or not _STATIC_NAME.fullmatch(name) or ".." in name:
        return None
    asset = resources.files("latentcast.server").joinpath("static").joinpath(name)
    try:
        if not asset.is_file():
            return None
        body = asset.read_bytes()
    except OSError:
        return None
    response = _response(http.HTTPStatus.OK, _STATIC_TYPES[suffix], body)
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def _response(
    status: http.HTTPStatus, content_type: str, body: bytes, *, retry_after: bool = False
) -> Response:
    headers = Headers()
    headers["Content-Type"] = content_type
    headers["Content-Length"] = str(len(body))
    headers["Cache-Control"] = "no-store"
    if retry_after:
        headers["Retry-After"] = "1"
    if status == http.HTTPStatus.UNAUTHORIZED:
        headers["WWW-Authenticate"] = 'Bearer realm="latentcast"'
    return Response(status.value, status.phrase, headers, body)


def _json(status: http.HTTPStatus, payload: object) -> Response:
    return _response(status, "application/json", json.dumps(payload).encode())


def _unauthorized() -> Response:
    return _response(
        http.HTTPStatus.UNAUTHORIZED, "text/plain; charset=utf-8", b"missing or wrong token\n"
    )
