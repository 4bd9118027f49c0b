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

Sessions are resumable (PROTOCOL.md section 2a) when the server offers it: a connection
lost without a deliberate close is taken over again by the reader (``Client._resume``),
messages already processed are dropped by their ``seq``, and the jobs never notice.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
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
    ControlRef,
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
from .resume import (
    RESUME_BACKOFF,
    RESUME_TRIES,
    SeqTracker,
    may_resume,
    resume_url,
    retry_delays,
    with_query,
)

logger = logging.getLogger("latentcast.client")

#: The path of latentcast's WebSocket endpoint (protocol v1).
WS_PATH = "/v1/ws"
DEFAULT_URL = f"ws://127.0.0.1:8765{WS_PATH}"
DEFAULT_OPEN_TIMEOUT = 10.0

#: A LoRA for ``submit(loras=...)``: a name (scale 1), (name, scale), or a LoraRef.
LoraSpec: TypeAlias = str | tuple[str, float] | LoraRef

#: A control for ``submit(controls=...)``: (name, image), (name, image, scale), a
#: mapping of ControlRef's fields (name, image, scale, start, end, preprocess), or a
#: ControlRef. An image is bytes (PNG, JPEG, WebP), a PIL image or a file path.
ControlSpec: TypeAlias = (
    tuple[str, ImageInput] | tuple[str, ImageInput, float] | Mapping[str, Any] | ControlRef
)

#: Opens a connection to a URL and reads its welcome (what a resume calls).
Opener: TypeAlias = Callable[[str], Awaitable[tuple[ClientConnection, Welcome]]]


class Client:
    """One session with a latentcast server. Get one with :func:`connect`."""

    def __init__(
        self,
        ws: ClientConnection,
        welcome: Welcome,
        *,
        url: str,
        reopen: Opener | None = None,
        resume_tries: int = RESUME_TRIES,
        resume_backoff: float = RESUME_BACKOFF,
    ) -> None:
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
        # Resumable sessions (PROTOCOL.md 2a): the token of the latest welcome, the last
        # seq processed, how to open a connection again, and how often to try.
        self._resume_token = welcome.resume_token
        self._seen = SeqTracker()
        self._reopen = reopen
        self._resume_delays = retry_delays(resume_tries, resume_backoff)
        #: After a resume: the id of the cancel whose unknown_job answer tells that every
        #: frame sent on the lost connection has been answered, and the submits to send
        #: again if they still have no answer by then (they never reached the server).
        self._sync_id: str | None = None
        self._unanswered: list[Job] = []
        #: How many times the session was taken over again after a lost connection.
        self.resumes = 0
        #: Why the last resume failed, for the ConnectionLost that jobs then get.
        self._resume_failure: str | None = None
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
        controls: Iterable[ControlSpec] | None = None,
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
        ``controls`` steer the job with the server's ControlNets (feature "controls",
        ``welcome.model.controlnets``); see :data:`ControlSpec`.

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
            "controls": _controls(controls) if controls is not None else None,
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

        The server cancels this session's unfinished jobs (reason ``disconnect``); on a
        resumable session, where the server would keep them for a resume, this client
        cancels them first.
        """
        if self._closing:
            await asyncio.shield(self._reader)
            return
        self._closing = True
        if self._resume_token is not None:
            for job in list(self._jobs.values()):
                await self._send_cancel(job)
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
        """The one reader: route every server message to its job until the end.

        On a resumable session a lost connection is taken over again (:meth:`_resume`)
        and reading goes on, the jobs none the wiser.
        """
        error: BaseException | None = None
        try:
            while True:
                try:
                    async for frame in self._ws:
                        self._dispatch(frame)
                except ConnectionClosed as exc:
                    error = exc
                if not await self._resume():
                    return
                error = None
        except Exception as exc:  # every job must hear of the end
            logger.exception("the reader stopped")
            error = exc
        finally:
            self._connection_lost(error)

    async def _resume(self) -> bool:
        """Take the session over on a new connection; False when it cannot be done.

        Only for a resumable session whose connection was lost (not closed by this
        client, nor on purpose by the server: see ``may_resume``). Tries a few times
        with back-off; a server that answers ``resumed:false`` has ended the session.
        """
        token, code = self._resume_token, self._ws.close_code
        if token is None or self._reopen is None or self._closing or not may_resume(code):
            return False
        logger.info("connection lost (%s): resuming after seq %d", code, self._seen.last)
        last_error = "no try made"
        for delay in self._resume_delays:
            await asyncio.sleep(delay)
            if self._closing:
                return False
            try:
                ws, welcome = await self._reopen(resume_url(self.url, token, self._seen.last))
            except ConnectFailed as exc:
                logger.info("resume failed: %s", exc.message)
                last_error = exc.message
                if isinstance(exc, AuthenticationFailed):
                    break
                continue
            if self._closing or not welcome.resumed:
                await ws.close()
                if not welcome.resumed:
                    logger.info("the server no longer has session %s", self.session)
                    self._resume_failure = "the server no longer has the session"
                return False
            self._switch(ws, welcome)
            self._resume_failure = None
            return True
        self._resume_failure = f"the session could not be resumed ({last_error})"
        return False

    def _switch(self, ws: ClientConnection, welcome: Welcome) -> None:
        """Go on with ``ws``; make sure what was sent on the lost connection counts."""
        self._ws = ws
        self.welcome = welcome
        self._resume_token = welcome.resume_token
        self.resumes += 1
        unanswered = [job for job in self._jobs.values() if not job._answered.is_set()]
        cancels = [job for job in self._jobs.values() if job.cancel_requested]
        logger.info(
            "resumed session %s after seq %d (%d submits unanswered)",
            welcome.session,
            self._seen.last,
            len(unanswered),
        )
        for job in cancels:  # a cancel sent on the lost connection may not have arrived
            self._spawn(self._send_cancel(job))
        if unanswered:
            # The server answers frames in order: once this cancel of no job is
            # answered, a submit still without an answer never reached it.
            self._sync_id = f"latentcast-resume-sync.{self.resumes}"
            self._unanswered = unanswered
            self._spawn(self._send(Cancel(id=self._sync_id)))

    async def _send(self, message: Cancel | Submit) -> None:
        try:
            await self._ws.send(encode_message(message))
        except ConnectionClosed:
            pass  # the reader resumes, or fails the jobs

    def _synced(self) -> None:
        """Every frame of the lost connection is answered: send the rest again."""
        again = [job for job in self._unanswered if not job._answered.is_set()]
        self._sync_id, self._unanswered = None, []
        for job in again:
            logger.info("job %s: the submit was lost with the connection; sending it again", job.id)
            self._spawn(self._send(job.request))

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
        if not self._seen.fresh(message.seq):
            logger.debug("skipping %s seq %s: processed already", message.type, message.seq)
            return
        if self._closing:
            return  # close() was called: unfinished jobs end with ConnectionLost
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
        if isinstance(message, Error) and message.id is not None and message.id == self._sync_id:
            self._synced()
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
        if self._resume_failure is not None and not self._closing:
            text = f"the connection was lost ({code}) and {self._resume_failure}"
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


def _controls(controls: Iterable[ControlSpec]) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = []
    for control in controls:
        if isinstance(control, ControlRef):
            result.append(control.model_dump())
        elif isinstance(control, Mapping):
            fields = dict(control)
            if "image" in fields and not isinstance(fields["image"], bytes):
                fields["image"] = image_bytes(fields["image"])
            result.append(fields)
        else:
            name, image, *scale = control
            entry: dict[str, Any] = {"name": name, "image": image_bytes(image)}
            if scale:
                entry["scale"] = scale[0]
            result.append(entry)
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
        resumable: bool = True,
        resume_tries: int = RESUME_TRIES,
        resume_backoff: float = RESUME_BACKOFF,
    ) -> None:
        self._url = url
        self._token = token
        self._open_timeout = open_timeout
        self._headers = dict(headers or {})
        self._resumable = resumable
        self._resume_tries = resume_tries
        self._resume_backoff = resume_backoff
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
        first_url = with_query(url, resumable="1") if self._resumable else url
        ws, welcome = await self._open_ws(first_url)
        return Client(
            ws,
            welcome,
            url=url,
            reopen=self._open_ws,
            resume_tries=self._resume_tries,
            resume_backoff=self._resume_backoff,
        )

    async def _open_ws(self, connect_url: str) -> tuple[ClientConnection, Welcome]:
        """Connect to ``connect_url`` (the URL with this connection's query) and read its
        welcome; raises ConnectFailed, whose messages name the URL given to connect()
        (never a resume token)."""
        url = self._url
        headers = dict(self._headers)
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            ws = await ws_connect(
                connect_url,
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
        return ws, welcome


def connect(
    url: str = DEFAULT_URL,
    token: str | None = None,
    *,
    open_timeout: float | None = DEFAULT_OPEN_TIMEOUT,
    headers: Mapping[str, str] | None = None,
    resumable: bool = True,
    resume_tries: int = RESUME_TRIES,
    resume_backoff: float = RESUME_BACKOFF,
) -> Connecting:
    """Open a session: ``client = await connect(url)`` or ``async with connect(url) as c``.

    ``token`` is sent as ``Authorization: Bearer``. Raises :class:`ConnectFailed`
    (:class:`AuthenticationFailed` for 401, :class:`ServerUnavailable` for 503).

    ``resumable`` (PROTOCOL.md section 2a, when the server offers "resume"): a connection
    lost without a deliberate close is taken over again, up to ``resume_tries`` times
    with ``resume_backoff`` seconds doubling between tries, and the jobs go on; only when
    that fails do they end with :class:`ConnectionLost`.
    """
    return Connecting(
        url,
        token,
        open_timeout=open_timeout,
        headers=headers,
        resumable=resumable,
        resume_tries=resume_tries,
        resume_backoff=resume_backoff,
    )


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
