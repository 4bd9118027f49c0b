"""One WebSocket session: decode what the client sends, answer, stream its jobs.

A session owns its unfinished jobs (by the client's ids), its outbound buffer and, while
it has a connection, two tasks: the reader (this coroutine's own) and the writer.
Everything the session does to jobs goes through the scheduler; everything it says goes
through the buffer, so the engine and other sessions never wait for this client.

A session is one connection, unless it is resumable (PROTOCOL.md section 2a, server/
resume.py): then the writer stamps every message with its ``seq`` in the session's
:class:`ReplayLog`, a lost connection only detaches the session (its jobs go on, its
messages keep buffering) and a resume attaches it to a new connection.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

from pydantic import BaseModel
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode

from latentcast.protocol import (
    FRAME_ERROR_CODES,
    PROTOCOL_VERSION,
    Accepted,
    Cancel,
    ClientMessage,
    Defaults,
    Error,
    ErrorCode,
    InvalidRequest,
    ModelInfo,
    ProtocolError,
    Submit,
    SubmitRules,
    Welcome,
    decode_client_message_in_steps,
    encode_message,
)
from latentcast.protocol.limits import DEFAULT_STRENGTH, SEED_SPACE

from .config import ServerConfig
from .images import BadImage, prepare_controls, prepare_images
from .jobs import GenerationRequest, Job, JobControl, StopReason
from .metrics import Metrics
from .outbound import BufferClosed, OutboundBuffer
from .resume import ReplayLog, ResumeRegistry, replay_log_bytes
from .scheduler import Scheduler

logger = logging.getLogger("latentcast.session")

#: How long a closing connection may take to exchange close frames before it is aborted.
#: A client that reads answers within a round trip; one that does not would hold the
#: connection (and the process at exit) forever.
CLOSE_HANDSHAKE_TIMEOUT = 0.5


@dataclass(frozen=True)
class ModelContext:
    """One model as a submit that names it (``params.model``) is checked and completed."""

    info: ModelInfo
    defaults: Defaults
    image_previews: bool = True
    scheduler_step_limits: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionContext:
    """What every session shares: built once by the server when the model is loaded."""

    config: ServerConfig
    server_name: str
    rules: SubmitRules
    defaults: Defaults
    model: ModelInfo
    scheduler: Scheduler
    metrics: Metrics
    is_draining: Callable[[], bool]
    #: Whether image previews can be made (latent_rgb factors or a preview decoder).
    image_previews: bool = True
    #: Schedulers that refuse more than some number of steps (lcm: 50).
    scheduler_step_limits: Mapping[str, int] = field(default_factory=dict)
    #: The optional protocol features announced in ``welcome.features``: "batching" when
    #: jobs may share denoising steps (``--max-batch`` above 1), "models" when several
    #: models are served, "controls" when ControlNets are loaded, "resume" when resumable
    #: sessions are offered (``resumes``).
    features: tuple[str, ...] = ()
    #: Tokens of resumable sessions and timers of detached ones; None: none offered.
    resumes: ResumeRegistry[Session] | None = None
    #: Every model by name, the default first (feature "models"); empty: only ``model``.
    models: Mapping[str, ModelContext] = field(default_factory=dict)

    def chosen(self, name: str | None) -> ModelContext:
        """The model a submit's ``params.model`` names (None: the default)."""
        model = self.models.get(name) if name is not None else None
        if model is not None:
            return model
        return ModelContext(
            self.model, self.defaults, self.image_previews, self.scheduler_step_limits
        )


class Session:
    def __init__(
        self, connection: ServerConnection, context: SessionContext, *, resumable: bool = False
    ) -> None:
        self.id = secrets.token_hex(6)
        self.connection = connection
        self.context = context
        self.jobs: dict[str, Job] = {}
        self.buffer = OutboundBuffer()
        config = context.config
        #: The seq counter and what a resume sends again; None: not resumable.
        self.replay: ReplayLog | None = (
            ReplayLog(
                window=config.resume_window,
                max_bytes=replay_log_bytes(
                    config.max_jobs_per_session, config.largest_result_bytes()
                ),
            )
            if resumable and context.resumes is not None
            else None
        )
        self._bad_frames = 0
        self._closing = False
        #: Set when the connection is closed on purpose but the session must stay (a stall
        #: or a takeover of a resumable session).
        self._detach_on_close = False
        self._ended = False
        self._run_done = asyncio.Event()
        self._run_done.set()

    @property
    def session_id(self) -> str:
        return self.id

    # ------------------------------------------------------------------ JobOwner

    def send(self, message: BaseModel) -> None:
        self.buffer.put(message)

    def send_latest(self, key: Hashable, build: Callable[[], BaseModel]) -> None:
        self.buffer.put_latest(key, build)

    def job_ended(self, job: Job) -> None:
        if self.jobs.get(job.id) is job:
            del self.jobs[job.id]

    # ------------------------------------------------------------------ lifecycle

    @property
    def resumable(self) -> bool:
        return self.replay is not None

    async def run(self, *, resumed_after: int | None = None) -> None:
        """Serve the connection until it closes; then cancel what is left of its jobs.

        A resumable session whose connection is lost (or sent away for not reading) is
        detached instead: its jobs go on and the registry ends it when the resume window
        passes. ``resumed_after``: this connection resumes the session, and the client
        has processed the messages up to that seq (:meth:`attach` first).
        """
        peer = self.connection.remote_address
        resumes = self.context.resumes
        self._run_done.clear()
        if resumes is not None:
            resumes.attached(self)
        token = resumes.issue(self) if resumes is not None and self.resumable else None
        logger.info(
            "session=%s %s from %s%s",
            self.id,
            "resumed" if resumed_after is not None else "connected",
            peer,
            " (resumable)" if self.resumable else "",
        )
        welcome = Welcome(
            protocol=PROTOCOL_VERSION,
            server=self.context.server_name,
            session=self.id,
            model=self.context.model,
            models=[model.info for model in self.context.models.values()] or [self.context.model],
            features=list(self.context.features),
            resume_token=token,
            resumed=resumed_after is not None,
            limits=self.context.rules.limits,
            defaults=self.context.defaults,
        )
        writer: asyncio.Task[None] | None = None
        try:
            if resumed_after is None:
                self.send(welcome)
            else:
                try:
                    async with asyncio.timeout(self.context.config.send_timeout):
                        await self._send_resumed(welcome, resumed_after)
                except TimeoutError:
                    await self.close_stalled()  # detached again, not ended
                    return
            writer = asyncio.create_task(self._write(), name=f"writer-{self.id}")
            await self._read()
        except ConnectionClosed:
            pass
        finally:
            keep = (
                self.resumable and not self._ended and (not self._closing or self._detach_on_close)
            )
            if not keep:
                self._disconnect()
            if writer is not None:
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
            if keep and resumes is not None:
                resumes.detached(self)
            logger.info("session=%s closed (code %s)", self.id, self.connection.close_code)
            self._run_done.set()

    def attach(self, connection: ServerConnection) -> None:
        """A resume: serve ``connection`` from now on (after :meth:`take_over`)."""
        self.connection = connection
        self._bad_frames = 0
        self._closing = False
        self._detach_on_close = False
        # What waited while detached gets a full send timeout on the new connection.
        self.buffer.restart_clock()

    async def take_over(self) -> None:
        """Before a resume: close the connection this session still has (a resume wins
        over a half-open connection), and wait until the session is detached from it."""
        if not self._run_done.is_set():
            logger.info("session=%s is resumed elsewhere: closing its old connection", self.id)
            self._detach_on_close = True
            await self.close(CloseCode.GOING_AWAY, "the session was resumed on a new connection")
            await self._run_done.wait()

    def expire(self) -> None:
        """End a detached session: its unfinished jobs are cancelled (nobody hears it)."""
        logger.info("session=%s ended while detached: %d unfinished jobs", self.id, len(self.jobs))
        self._disconnect()

    async def _send_resumed(self, welcome: Welcome, after: int) -> None:
        """PROTOCOL.md section 2a: welcome, the kept non-droppable messages after
        ``after``, the latest droppable state of each unfinished job; the writer then
        goes on with what is buffered."""
        replay = self.replay
        assert replay is not None
        frames = [encode_message(welcome), *replay.replay(after)]
        replayed = len(frames) - 1
        for message in replay.droppable_state(self.jobs.keys(), after):
            frames.append(replay.write(message, droppable=True))
        logger.info(
            "session=%s resumed after seq %d: %d messages again, %d latest states",
            self.id,
            after,
            replayed,
            len(frames) - 1 - replayed,
        )
        for frame in frames:
            await self.connection.send(frame)

    async def close(
        self,
        code: int,
        reason: str,
        *,
        flush_timeout: float = 0.0,
        handshake_timeout: float = CLOSE_HANDSHAKE_TIMEOUT,
    ) -> None:
        """Close the connection; it is gone within ``flush_timeout + handshake_timeout``.

        First the client gets up to ``flush_timeout`` to read what is buffered, then up to
        ``handshake_timeout`` for the closing handshake. A client that does not read cannot
        take the close frame (websockets would wait for the socket to drain forever), so a
        connection still open by then is aborted: the TCP connection is reset at once.
        """
        if self._closing:
            return
        self._closing = True
        if flush_timeout > 0:
            try:
                async with asyncio.timeout(flush_timeout):
                    await self.buffer.wait_empty()
            except TimeoutError:
                logger.info("session=%s did not read its last messages in time", self.id)
        try:
            async with asyncio.timeout(handshake_timeout):
                await self.connection.close(code, reason)
        except TimeoutError:
            logger.warning(
                "session=%s did not complete the close within %.1f s: aborting the connection",
                self.id,
                handshake_timeout,
            )
            self.connection.transport.abort()
            await self.connection.wait_closed()

    def stalled(self) -> bool:
        """True when a message that must not be dropped has waited past the send timeout."""
        return self.buffer.oldest_unsent_age() > self.context.config.send_timeout

    async def close_stalled(self) -> None:
        if self._closing:
            return
        logger.warning(
            "session=%s has not read for %.0f s: disconnecting%s",
            self.id,
            self.context.config.send_timeout,
            " (the session stays resumable)" if self.resumable else "",
        )
        self.context.metrics.slow_disconnects.inc()
        if self.resumable:
            self._detach_on_close = True
        else:
            self._disconnect()
        await self.close(CloseCode.POLICY_VIOLATION, "send timeout: the client is not reading")

    # ------------------------------------------------------------------ reading

    async def _read(self) -> None:
        config = self.context.config
        try:
            async for frame in self.connection:
                await self._handle(frame)
                if self._bad_frames >= config.max_bad_frames:
                    logger.warning(
                        "session=%s sent %d bad frames: closing", self.id, self._bad_frames
                    )
                    await self.close(
                        CloseCode.POLICY_VIOLATION,
                        "too many bad frames",
                        flush_timeout=config.send_timeout,
                    )
                    return
                # Backpressure: a client that sends without reading waits here, and the
                # send timeout ends it if it never reads.
                await self.buffer.wait_backlog_below(config.max_pending_messages)
                if self.buffer.closed:
                    return
        except ConnectionClosed:
            pass

    async def _handle(self, frame: bytes | str) -> None:
        try:
            message = await self._decode(frame)
        except ProtocolError as exc:
            if exc.code in FRAME_ERROR_CODES:
                self._bad_frames += 1
                self.context.metrics.bad_frames.inc()
            elif isinstance(exc, InvalidRequest) and exc.message_type == "submit":
                self.context.metrics.jobs.labels(outcome="rejected").inc()
            job = exc.id if exc.id is None or len(exc.id) <= 64 else exc.id[:64] + "..."
            logger.info("session=%s job=%s rejected: %s (%s)", self.id, job, exc.code, exc.message)
            self.send(Error(id=exc.id, code=exc.code, message=exc.message, field=exc.field))
            return
        try:
            if isinstance(message, Submit):
                await self._submit(message)
            elif isinstance(message, Cancel):
                self._cancel(message)
        except Exception as exc:
            logger.exception("session=%s job=%s: internal error", self.id, message.id)
            self.send(
                Error(id=message.id, code=ErrorCode.INTERNAL, message=f"internal error: {exc}")
            )

    async def _decode(self, frame: bytes | str) -> ClientMessage:
        """Decode and validate a frame in bounded steps (PROTOCOL.md section 1: no frame
        may stall other sessions). A small frame is one step; this session's frames are
        still handled one at a time, in order.

        After each step the loop sleeps as long as the step took: other tasks run, and the
        GIL is free for the engine thread, which otherwise waits up to the interpreter's
        switch interval (5 ms) each time it takes the GIL back between two torch calls.
        """
        steps = decode_client_message_in_steps(frame, self.context.rules)
        while True:
            started = time.perf_counter()
            try:
                next(steps)
            except StopIteration as done:
                message: ClientMessage = done.value
                return message
            await asyncio.sleep(min(time.perf_counter() - started, 0.1))

    def _reject(
        self, submit: Submit, code: ErrorCode, message: str, field: str | None = None
    ) -> None:
        logger.info("session=%s job=%s rejected: %s (%s)", self.id, submit.id, code, message)
        self.context.metrics.jobs.labels(outcome="rejected").inc()
        self.send(Error(id=submit.id, code=code, message=message, field=field))

    async def _submit(self, submit: Submit) -> None:
        """Checks in the order of PROTOCOL.md section 3, then queue and answer."""
        context = self.context
        scheduler = context.scheduler
        params = submit.params
        # Every default and rule from here on is the chosen model's (PROTOCOL.md section 3).
        model = context.chosen(params.model)
        defaults = model.defaults
        steps = params.steps or defaults.steps
        strength = params.strength if params.strength is not None else DEFAULT_STRENGTH
        scheduler_name = params.scheduler or defaults.scheduler
        step_limit = model.scheduler_step_limits.get(scheduler_name)
        if step_limit is not None and steps > step_limit:
            return self._reject(
                submit,
                ErrorCode.INVALID_REQUEST,
                f"params.steps must be at most {step_limit} with scheduler {scheduler_name!r}",
                field="params.steps",
            )
        if context.is_draining():
            return self._reject(submit, ErrorCode.DRAINING, "the server is shutting down")
        if submit.id in self.jobs:
            return self._reject(
                submit, ErrorCode.DUPLICATE_ID, f"job {submit.id!r} is still unfinished"
            )
        unsupported = self._unsupported(submit, model)
        if unsupported is not None:
            return self._reject(submit, ErrorCode.UNSUPPORTED, unsupported)
        init_image = mask = None
        width, height = params.width or defaults.width, params.height or defaults.height
        if params.init_image is not None:
            try:
                init_image, mask, width, height = await asyncio.to_thread(
                    prepare_images, params, context.rules.limits
                )
            except BadImage as exc:
                return self._reject(submit, ErrorCode.BAD_IMAGE, exc.message)
            if context.is_draining():  # the drain may have begun while decoding
                return self._reject(submit, ErrorCode.DRAINING, "the server is shutting down")
        controls: tuple[JobControl, ...] = ()
        if params.controls:
            try:
                controls = await asyncio.to_thread(
                    prepare_controls, params, context.rules.limits, width, height
                )
            except BadImage as exc:
                return self._reject(submit, ErrorCode.BAD_IMAGE, exc.message)
            if context.is_draining():
                return self._reject(submit, ErrorCode.DRAINING, "the server is shutting down")
        replacing = self.jobs.get(submit.replaces) if submit.replaces is not None else None
        active = len(self.jobs) - (1 if replacing is not None else 0)
        if active >= context.rules.limits.max_jobs_per_session:
            return self._reject(
                submit,
                ErrorCode.TOO_MANY_JOBS,
                f"this session already has {active} unfinished jobs "
                f"(limit {context.rules.limits.max_jobs_per_session})",
            )
        if not scheduler.has_room(replacing=replacing):
            return self._reject(
                submit, ErrorCode.QUEUE_FULL, f"the queue holds {scheduler.max_queue} jobs"
            )
        request = GenerationRequest(
            prompt=params.prompt,
            negative_prompt=params.negative_prompt,
            width=width,
            height=height,
            steps=steps,
            guidance_scale=(
                params.guidance_scale
                if params.guidance_scale is not None
                else defaults.guidance_scale
            ),
            seed=params.seed if params.seed is not None else secrets.randbelow(SEED_SPACE),
            scheduler=scheduler_name,
            num_images=params.num_images,
            preview=submit.preview,
            output=submit.output,
            mode=params.mode,
            init_image=init_image,
            mask=mask,
            strength=strength,
            loras=tuple((lora.name, lora.scale) for lora in params.loras),
            controls=controls,
            model=params.model,
        )
        job = Job(id=submit.id, owner=self, request=request)
        position = scheduler.submit(job, replacing=replacing)
        self.jobs[job.id] = job
        logger.info(
            "session=%s job=%s accepted (%s on %s) at position %d%s",
            self.id,
            job.id,
            request.mode,
            model.info.name,
            position,
            f" replacing {submit.replaces}" if submit.replaces else "",
        )
        self.send(Accepted(id=job.id, position=position))
        return None

    def _unsupported(self, submit: Submit, chosen: ModelContext) -> str | None:
        model = chosen.info
        mode = submit.params.mode
        if mode not in model.modes:
            return (
                f"{mode} is not available with model {model.name!r} "
                f"(modes: {', '.join(model.modes)})"
            )
        if submit.preview.kind == "image" and not chosen.image_previews:
            return "image previews are not available for this model; ask for latent previews"
        return None

    def _cancel(self, cancel: Cancel) -> None:
        job = self.jobs.get(cancel.id)
        if job is None:
            self.send(
                Error(
                    id=cancel.id,
                    code=ErrorCode.UNKNOWN_JOB,
                    message=f"no unfinished job {cancel.id!r} in this session",
                )
            )
            return
        logger.info("session=%s job=%s cancel requested", self.id, job.id)
        self.context.scheduler.stop(job, StopReason.CLIENT)

    # ------------------------------------------------------------------ writing

    async def _write(self) -> None:
        try:
            while True:
                entry = await self.buffer.get()
                try:
                    message = entry.build()
                    if self.replay is not None and not isinstance(message, Welcome):
                        # The seq is given here, as the message leaves the buffer; a
                        # written message is kept for a resume even if the connection
                        # fails under it.
                        frame = self.replay.write(message, droppable=entry.droppable)
                    else:
                        frame = encode_message(message)
                except Exception:
                    logger.exception("session=%s: could not build a message", self.id)
                    self.buffer.sent(entry)
                    continue
                try:
                    await self.connection.send(frame)
                finally:
                    self.buffer.sent(entry)
        except (BufferClosed, ConnectionClosed):
            return

    def _disconnect(self) -> None:
        """The client is gone (or being sent away): cancel its jobs, stop buffering."""
        self._ended = True
        if self.context.resumes is not None:
            self.context.resumes.forget(self)
        self.buffer.close()
        scheduler = self.context.scheduler
        for job in list(self.jobs.values()):
            scheduler.stop(job, StopReason.DISCONNECT)
        scheduler.forget_session(self.id)
