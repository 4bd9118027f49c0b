"""The asyncio client: one WebSocket session, one reader task, many jobs.

::

    async with connect("ws://127.0.0.1:8765/v1/ws") as client:
        job = await client.submit("a red fox in snow", steps=20, preview="latent")
        async for event in job:
            ...
        result = await job.result()

Every message goes through :mod:`latentcast.protocol`: requests are built and checked
with its models (with the limits, schedulers and LoRAs from ``welcome``, so a bad
request fails here exactly as the server would answer it), and frames are decoded with
its codec. The reader task routes each server message to its job by id and never waits
on a consumer (see :mod:`latentcast.client.job`).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import re
import time
from collections.abc import Generator, Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import Any, Self, TypeAlias
from urllib.parse import urlsplit, urlunsplit

from PIL import Image
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import (
    ConnectionClosed,
    InvalidHandshake,
    InvalidStatus,
    InvalidURI,
)

from latentcast.protocol import (
    PROTOCOL_VERSION,
    Cancel,
    Draining,
    Error,
    ErrorCode,
    ImagePreview,
    InvalidRequest,
    LatentPreview,
    LatentRGBInfo,
    LoraRef,
    ModelInfo,
    ModelRules,
    PreviewRequest,
    ProtocolError,
    Submit,
    SubmitRules,
    Welcome,
    decode_server_message,
    encode_message,
    validate_client_message,
)

from .errors import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionLost,
    RequestRejected,
    ServerUnavailable,
)
from .images import ImageInput, image_bytes, preview_to_pil
from .job import Job

logger = logging.getLogger("latentcast.client")

#: The path of latentcast's WebSocket endpoint (protocol v1).
WS_PATH = "/v1/ws"
DEFAULT_URL = f"ws://127.0.0.1:8765{WS_PATH}"
DEFAULT_OPEN_TIMEOUT = 10.0

#: A LoRA for ``submit(loras=...)``: a name (scale 1), (name, scale), or a LoraRef.
LoraSpec: TypeAlias = str | tuple[str, float] | LoraRef


class Client:
    """One session with a latentcast server. Get one with :func:`connect`."""

    def __init__(self, ws: ClientConnection, welcome: Welcome, *, url: str) -> None:
        self.url = url
        #: The server's ``welcome``: model, limits and defaults.
        self.welcome = welcome
        #: Set when the server announces a shutdown (``draining``); see drain_deadline.
        self.draining = asyncio.Event()
        #: ``time.monotonic()`` at which the server ends unfinished jobs, once draining.
        self.drain_deadline: float | None = None
        self._ws = ws
        self._rules = SubmitRules(
            limits=welcome.limits,
            schedulers=tuple(welcome.model.schedulers),
            loras=tuple(welcome.model.loras),
            controlnets=tuple(welcome.model.controlnets),
            models={
                info.name: ModelRules(
                    schedulers=tuple(info.schedulers),
                    loras=tuple(info.loras),
                    controlnets=tuple(info.controlnets),
                )
                for info in welcome.models
            },
        )
        self._jobs: dict[str, Job] = {}
        self._ids = itertools.count(1)
        self._lost: ConnectionLost | None = None
        self._closing = False
        self._background: set[asyncio.Task[None]] = set()
        self._reader = asyncio.create_task(self._read(), name=f"latentcast-reader-{url}")

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<latentcast Client {self.url} session={self.welcome.session} {state}>"

    # ------------------------------------------------------------------ state

    @property
    def session(self) -> str:
        """The server's id for this session (from ``welcome``)."""
        return self.welcome.session

    @property
    def latent_rgb(self) -> LatentRGBInfo | None:
        """The default model's latent-to-RGB factors, for :meth:`preview_to_pil`."""
        return self.welcome.model.latent_rgb

    def model_info(self, name: str | None = None) -> ModelInfo:
        """The server's model ``name`` (``welcome.models``; None: the default model).

        Raises:
            KeyError: the server has no such model.
        """
        if name is None:
            return self.welcome.model
        for info in self.welcome.models:
            if info.name == name:
                return info
        known = ", ".join(info.name for info in self.welcome.models)
        raise KeyError(f"the server has no model {name!r} (it has: {known})")

    @property
    def closed(self) -> bool:
        """True once the connection has ended, for whatever reason."""
        return self._lost is not None

    @property
    def jobs(self) -> Mapping[str, Job]:
        """This session's unfinished jobs (and submits not yet answered), by id."""
        return MappingProxyType(self._jobs)

    # ------------------------------------------------------------------ requests

    async def submit(
        self,
        prompt: str,
        *,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        scheduler: str | None = None,
        num_images: int | None = None,
        init_image: ImageInput | None = None,
        strength: float | None = None,
        mask: ImageInput | None = None,
        loras: Iterable[LoraSpec] | None = None,
        model: str | None = None,
        preview: str | PreviewRequest | None = None,
        preview_every: int | None = None,
        preview_format: str | None = None,
        preview_max_side: int | None = None,
        output_format: str | None = None,
        output_quality: int | None = None,
        replaces: Job | str | None = None,
        id: str | None = None,
    ) -> Job:
        """Submit a job; returns it once the server has accepted it.

        Omitted options take the server's defaults (``welcome.defaults``). ``model`` names
        one of ``welcome.models`` (feature "models"; default: the server's default model).
        ``preview``
        is ``"none"``, ``"latent"``, ``"image"`` or a :class:`PreviewRequest` (the other
        ``preview_*`` options override its fields). ``replaces`` cancels that job in the
        same moment as this one is queued. ``id`` defaults to a fresh unique one.

        Raises :class:`RequestRejected` (``code``, ``field``) when the server, or this
        client applying the server's own rules, refuses the request, and
        :class:`ConnectionLost` when the connection ends before the answer; ``OSError``
        when an image given as a path cannot be read.
        """
        self._raise_if_closed()
        job_id = id if id is not None else self._new_id()
        if job_id in self._jobs:
            raise RequestRejected(
                ErrorCode.DUPLICATE_ID,
                f"job {job_id!r} is still unfinished",
                job_id=job_id,
                local=True,
            )
        params: dict[str, Any] = {
            "prompt": prompt,
            "negative_prompt": negative_prompt,
            "width": width,
            "height": height,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "seed": seed,
            "scheduler": scheduler,
            "num_images": num_images,
            "init_image": image_bytes(init_image) if init_image is not None else None,
            "strength": strength,
            "mask": image_bytes(mask) if mask is not None else None,
            "loras": _loras(loras) if loras is not None else None,
            "model": model,
        }
        payload: dict[str, Any] = {
            "type": "submit",
            "id": job_id,
            "params": params,
            "preview": _preview(preview, preview_every, preview_format, preview_max_side),
            "output": {"format": output_format, "quality": output_quality},
            "replaces": replaces.id if isinstance(replaces, Job) else replaces,
        }
        message = check_submit(payload, self._rules)
        job = Job(message, self._send_cancel)
        self._jobs[job_id] = job
        try:
            await self._ws.send(encode_message(message))
        except ConnectionClosed:
            pass  # the reader fails the job with ConnectionLost
        try:
            await job._wait_answer()
        except asyncio.CancelledError:
            # Nobody will see this job: do not leave it running on the server.
            if not job.done:
                self._spawn(job.cancel())
            raise
        return job

    async def replace(self, job: Job | str, prompt: str, **params: Any) -> Job:
        """``submit(prompt, replaces=job, **params)``: the live front end's primitive."""
        return await self.submit(prompt, replaces=job, **params)

    def preview_to_pil(
        self, preview: LatentPreview | ImagePreview, model: str | None = None
    ) -> Image.Image:
        """A preview event as a PIL image (latent previews via the ``latent_rgb`` of the
        job's ``model``; None: the default model)."""
        return preview_to_pil(preview, self.model_info(model).latent_rgb)

    # ------------------------------------------------------------------ lifecycle

    async def close(self) -> None:
        """Close the connection; unfinished jobs fail with ConnectionLost. Idempotent.

        The server cancels this session's unfinished jobs (reason ``disconnect``).
        """
        self._closing = True
        await self._ws.close()
        try:
            await asyncio.shield(self._reader)
        finally:
            for task in list(self._background):
                task.cancel()
            if self._background:
                await asyncio.gather(*self._background, return_exceptions=True)

    async def wait_closed(self) -> ConnectionLost:
        """Until the connection ends; returns the error that unfinished jobs got."""
        await asyncio.shield(self._reader)
        assert self._lost is not None
        return self._lost

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ internals

    def _new_id(self) -> str:
        while True:
            candidate = f"job-{next(self._ids)}"
            if candidate not in self._jobs:
                return candidate

    def _raise_if_closed(self) -> None:
        if self._lost is not None:
            raise ConnectionLost(
                f"the connection is closed ({self._lost.message})",
                code=self._lost.code,
                reason=self._lost.reason,
            )

    async def _send_cancel(self, job: Job) -> None:
        try:
            await self._ws.send(encode_message(Cancel(id=job.id)))
        except ConnectionClosed:
            pass  # the server cancels the jobs of a closed connection by itself

    def _spawn(self, coroutine: Any) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _read(self) -> None:
        """The one reader: route every server message to its job until the end."""
        error: BaseException | None = None
        try:
            async for frame in self._ws:
                self._dispatch(frame)
        except ConnectionClosed as exc:
            error = exc
        except Exception as exc:  # every job must hear of the end
            logger.exception("the reader stopped")
            error = exc
        finally:
            self._connection_lost(error)

    def _dispatch(self, frame: bytes | str) -> None:
        if isinstance(frame, str):
            logger.warning("ignoring a text frame from the server")
            return
        try:
            message = decode_server_message(frame)
        except ProtocolError as exc:
            # A newer server's message type, or a broken frame: nothing to route it to.
            logger.warning("ignoring a server message: %s", exc.message)
            return
        if isinstance(message, Draining):
            self.drain_deadline = time.monotonic() + message.deadline_ms / 1000
            self.draining.set()
            logger.info("the server is draining: %d ms left", message.deadline_ms)
            return
        if isinstance(message, Welcome):
            logger.warning("ignoring a second welcome")
            return
        if isinstance(message, Error) and message.id is None:
            logger.warning("server error %s: %s", message.code, message.message)
            return
        if isinstance(message, Error) and message.code == ErrorCode.UNKNOWN_JOB:
            # Only ever the answer to a cancel that crossed its job's end.
            logger.debug("cancel of %s: %s", message.id, message.message)
            return
        assert message.id is not None
        job = self._jobs.get(message.id)
        if job is None:
            logger.debug("ignoring %s for a job this client does not have", message.type)
            return
        if job._deliver(message):
            del self._jobs[job.id]

    def _connection_lost(self, error: BaseException | None) -> None:
        ws = self._ws
        code, reason = ws.close_code, ws.close_reason or ""
        if self._closing:
            text = "the client closed the connection"
        elif code is not None:
            text = f"the server closed the connection ({code}{' ' + reason if reason else ''})"
        else:
            text = f"the connection was lost ({error or 'no close frame'})"
        self._lost = ConnectionLost(text, code=code, reason=reason)
        jobs, self._jobs = list(self._jobs.values()), {}
        for job in jobs:
            job._connection_lost(self._lost)
        if jobs:
            logger.info("%s: %d unfinished jobs lost", text, len(jobs))


def check_submit(payload: dict[str, Any], rules: SubmitRules) -> Submit:
    """The Submit model of ``payload``, checked with the server's own rules.

    Raises :class:`RequestRejected` (``invalid_request``, ``local=True``) naming the first
    offending field, with the message the server would have answered.
    """
    try:
        message = validate_client_message(payload, rules)
    except InvalidRequest as exc:
        raise RequestRejected(
            exc.code, exc.message, field=exc.field, job_id=exc.id, local=True
        ) from None
    assert isinstance(message, Submit)
    return message


def _loras(loras: Iterable[LoraSpec]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for lora in loras:
        if isinstance(lora, LoraRef):
            result.append(lora.model_dump())
        elif isinstance(lora, str):
            result.append({"name": lora})
        else:
            name, scale = lora
            result.append({"name": name, "scale": scale})
    return result


def _preview(
    preview: str | PreviewRequest | None,
    every: int | None,
    format: str | None,
    max_side: int | None,
) -> dict[str, Any]:
    fields: dict[str, Any] = (
        preview.model_dump(exclude_none=True)
        if isinstance(preview, PreviewRequest)
        else {"kind": preview}
    )
    overrides = {"every": every, "format": format, "max_side": max_side}
    fields.update({key: value for key, value in overrides.items() if value is not None})
    return fields


class Connecting:
    """What :func:`connect` returns: await it, or use it as an async context manager."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        open_timeout: float | None,
        headers: Mapping[str, str] | None,
    ) -> None:
        self._url = url
        self._token = token
        self._open_timeout = open_timeout
        self._headers = dict(headers or {})
        self._client: Client | None = None

    def __await__(self) -> Generator[Any, None, Client]:
        return self._open().__await__()

    async def __aenter__(self) -> Client:
        self._client = await self._open()
        return self._client

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._client is not None:
            await self._client.close()

    async def _open(self) -> Client:
        url = self._url
        headers = dict(self._headers)
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            ws = await ws_connect(
                url,
                additional_headers=headers,
                compression=None,
                # Unlimited until welcome says how large messages may be.
                max_size=None,
                open_timeout=self._open_timeout,
                user_agent_header="latentcast-python-client",
            )
        except InvalidStatus as exc:
            raise _refused(url, exc) from None
        except InvalidURI as exc:
            raise ConnectFailed(f"invalid URL {url!r}: {exc}", url=url) from None
        except TimeoutError:
            raise ConnectFailed(
                f"cannot connect to {url}: no answer within {self._open_timeout} s",
                url=url,
                reason="timeout",
            ) from None
        except OSError as exc:
            if _connection_refused(exc):
                raise ConnectFailed(
                    f"no server answers at {url} (connection refused): is a latentcast "
                    "server running there?",
                    url=url,
                    reason="refused",
                ) from None
            raise ConnectFailed(f"cannot connect to {url}: {_describe(exc)}", url=url) from None
        except InvalidHandshake as exc:
            raise ConnectFailed(f"cannot connect to {url}: {_describe(exc)}", url=url) from None
        welcome = None
        try:
            async with asyncio.timeout(self._open_timeout):
                frame = await ws.recv()
            welcome = decode_server_message(frame) if isinstance(frame, bytes) else None
            if not isinstance(welcome, Welcome) or welcome.protocol != PROTOCOL_VERSION:
                what = (
                    f"speaks protocol {welcome.protocol}"
                    if isinstance(welcome, Welcome)
                    else "did not send a welcome"
                )
                raise ConnectFailed(
                    f"{url} {what}; this client speaks protocol {PROTOCOL_VERSION}", url=url
                )
        except (ConnectionClosed, TimeoutError, ProtocolError) as exc:
            raise ConnectFailed(
                f"{url} did not send a latentcast welcome ({_describe(exc)})", url=url
            ) from None
        finally:
            if not isinstance(welcome, Welcome) or welcome.protocol != PROTOCOL_VERSION:
                await ws.close()
        ws.protocol.max_message_size = welcome.limits.max_message_bytes
        logger.debug("connected to %s (%s, session %s)", url, welcome.server, welcome.session)
        return Client(ws, welcome, url=url)


def connect(
    url: str = DEFAULT_URL,
    token: str | None = None,
    *,
    open_timeout: float | None = DEFAULT_OPEN_TIMEOUT,
    headers: Mapping[str, str] | None = None,
) -> Connecting:
    """Open a session: ``client = await connect(url)`` or ``async with connect(url) as c``.

    ``token`` is sent as ``Authorization: Bearer``. Raises :class:`ConnectFailed`
    (:class:`AuthenticationFailed` for 401, :class:`ServerUnavailable` for 503).
    """
    return Connecting(url, token, open_timeout=open_timeout, headers=headers)


def _refused(url: str, exc: InvalidStatus) -> ConnectFailed:
    status = exc.response.status_code
    body = exc.response.body.decode("utf-8", "replace").strip() if exc.response.body else ""
    detail = f": {body}" if body and len(body) < 200 else ""
    if status == 401:
        return AuthenticationFailed(
            f"{url} refused the connection (HTTP 401): a valid token is needed",
            url=url,
            status=status,
            reason="unauthorized",
        )
    if status == 503:
        reason = _unavailable_reason(body)
        what = {
            "loading": "is still loading its model; try again in a moment",
            "draining": "is shutting down (draining) and takes no new connections",
            "connection_limit": "is at its connection limit; try again later",
        }.get(reason or "", "is unavailable")
        return ServerUnavailable(
            f"{url} {what} (HTTP 503{detail if reason is None else ''})",
            url=url,
            status=status,
            reason=reason,
        )
    if status == 404:
        parts = urlsplit(url)
        if parts.path != WS_PATH:
            suggestion = urlunsplit(parts._replace(path=WS_PATH))
            return ConnectFailed(
                f"no latentcast endpoint at {parts.path or '/'} on {parts.netloc} (HTTP 404); "
                f"the WebSocket path is {WS_PATH}: try {suggestion}",
                url=url,
                status=status,
                reason="not_found",
            )
        return ConnectFailed(
            f"{url} answered HTTP 404: whatever listens at {parts.netloc} has no {WS_PATH} "
            "endpoint; is it a latentcast server?",
            url=url,
            status=status,
            reason="not_found",
        )
    return ConnectFailed(
        f"{url} refused the connection (HTTP {status}{detail})", url=url, status=status
    )


def _unavailable_reason(body: str) -> str | None:
    """What a latentcast 503 body ("unavailable: loading") says, as a reason code."""
    text = body.lower()
    if "loading" in text:
        return "loading"
    if "draining" in text or "shutting down" in text:
        return "draining"
    if "connection limit" in text:
        return "connection_limit"
    return None


def _connection_refused(exc: OSError) -> bool:
    """True when nothing listens there (every address tried refused the connection)."""
    if isinstance(exc, ConnectionRefusedError):
        return True
    # asyncio joins the errors of several addresses (IPv6 and IPv4) into one OSError.
    codes = re.findall(r"\[Errno (\d+)\]", str(exc)) if exc.errno is None else []
    return bool(codes) and all(int(code) == errno.ECONNREFUSED for code in codes)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, OSError):
        if exc.errno:
            text = os.strerror(exc.errno)
        elif exc.strerror:
            text = exc.strerror
    return text or type(exc).__name__
