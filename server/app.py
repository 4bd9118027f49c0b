"""The server's lifecycle, as explicit steps: start, serve, drain, close.

::

    start()   bind the port (HTTP answers from now on; /ready says "loading"),
              then load the model on the engine thread and start the engine loop
    serve     until stop is requested (SIGTERM / SIGINT, or request_stop())
    drain()   PROTOCOL.md section 7: refuse new work, tell every session, let jobs end
              until the deadline, then end the rest with error{shutdown}, give each
              connection a short grace to read, close with 1001 (abort if it does not read)
    close()   stop the engine loop and the threads; idempotent

:func:`run` wires these to signals: a handler only records the signal and wakes the
loop; a second one moves the drain deadline to now. :func:`run_and_exit` ends the
process the moment the server is closed, so that the exit bounds of section 7 hold
even while the engine thread is still inside a long denoising step.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import gc
import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TYPE_CHECKING, NoReturn, Self

import torch
from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import CloseCode

from latentcast.protocol import (
    Defaults,
    Draining,
    Error,
    ErrorCode,
    LatentRGBInfo,
    ModelInfo,
    ModelRules,
    SubmitRules,
)

from . import __version__
from .config import ServerConfig
from .engine import (
    EngineHandle,
    EngineThread,
    EngineWorker,
    LocalEngine,
    ModelFacts,
    default_max_batch,
)
from .engine.models import ModelSet
from .metrics import Metrics
from .models import LoadedModel, resolve_device
from .models.controlnets import MAX_CONTROLS_PER_JOB
from .resume import ResumeRegistry, ResumeRequest
from .scheduler import Scheduler
from .session import ModelContext, Session, SessionContext
from .transport import WS_PATH, HttpFront, ServerStatus

if TYPE_CHECKING:
    from .engine.ray_engine import RayRuntime

logger = logging.getLogger("latentcast.server")

CLOSE_TIMEOUT = 5.0
#: How long close() waits, by default, for the engine thread to leave a stopped job (or a
#: model load). A process that exits does not wait this long: see :func:`run`.
ENGINE_STOP_TIMEOUT = 30.0
#: How long close() waits for Ray to disconnect (and stop a runtime it started).
RAY_STOP_TIMEOUT = 5.0
#: PROTOCOL.md section 7: the process exits within the drain timeout + this of the first
#: signal, and within this of a second one.
EXIT_BOUND = 6.0
#: Kept back from EXIT_BOUND for the last log lines and the exit itself.
EXIT_MARGIN = 0.3
#: After the sessions are closed, how long close() waits for the websockets server to
#: let go of connections still in their handshake before it aborts them.
SERVER_CLOSE_TIMEOUT = 0.5
#: Keepalive (PROTOCOL.md section 1): a ping every 20 s, closed with 1011 when the pong
#: has not come 20 s later.
PING_INTERVAL = 20.0
PING_TIMEOUT = 20.0
#: Incoming frames websockets buffers per connection before it stops reading the socket.
RECEIVE_QUEUE_FRAMES = 2


class Phase(enum.Enum):
    CREATED = "created"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    CLOSED = "closed"


class Server:
    """One latentcast server: a port, one engine, many sessions.

    Tests use it as an async context manager::

        async with Server(config) as server:
            await server.wait_ready()
            ... connect to server.ws_url ...
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.scheduler = Scheduler(max_queue=config.max_queue, metrics=self.metrics)
        #: Sessions with a connection; detached resumable ones are in ``resumes``.
        self.sessions: set[Session] = set()
        self.resumes: ResumeRegistry[Session] = ResumeRegistry(
            window=config.resume_window, metrics=self.metrics
        )
        self.phase = Phase.CREATED
        self._thread = EngineThread()
        self._encoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="latentcast-encode")
        self._ws_server: WebSocketServer | None = None
        self._port: int | None = None
        self._context: SessionContext | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._ready = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._deadline_now = asyncio.Event()
        self._load_error: BaseException | None = None
        #: Why the engine loop died, if it did: fatal for the whole server.
        self._engine_error: BaseException | None = None
        #: One per engine: the embedded one, or each Ray actor.
        self._workers: list[EngineWorker] = []
        #: The embedded engine's models (None with Ray engines).
        self._models: ModelSet | None = None
        #: The Ray runtime the engines live on, when they are Ray actors.
        self._ray: RayRuntime | None = None
        #: time.monotonic() of the first and the latest request_stop() (signals).
        self._first_stop_at: float | None = None
        self._last_stop_at: float | None = None

    # ------------------------------------------------------------------ state

    def _set_phase(self, phase: Phase) -> None:
        logger.debug("phase %s -> %s", self.phase.value, phase.value)
        self.phase = phase

    def _accepting(self) -> bool:
        """Whether new connections and jobs are welcome."""
        return self.phase is Phase.READY and self._engine_error is None

    def status(self) -> ServerStatus:
        reason = {Phase.READY: None, Phase.DRAINING: "draining", Phase.CLOSED: "draining"}.get(
            self.phase, "loading"
        )
        if self._engine_error is not None:
            reason = "draining"  # the server is on its way out
        ready = self._accepting()
        if ready and not any(worker.alive for worker in self._workers):
            ready, reason = False, "no engines"
        return ServerStatus(
            ready=ready,
            reason=reason,
            at_connection_limit=len(self.sessions) >= self.config.max_connections,
        )

    @property
    def workers(self) -> tuple[EngineWorker, ...]:
        """One engine loop per engine serving now; with Ray engines, more join as they load."""
        return tuple(self._workers)

    @property
    def model(self) -> LoadedModel | None:
        """The default model while it is loaded in this process (None with Ray engines)."""
        return None if self._models is None else self._models.loaded(self._models.default)

    @property
    def models(self) -> ModelSet | None:
        """The embedded engine's models (None with Ray engines)."""
        return self._models

    @property
    def engine_thread(self) -> EngineThread:
        """The thread that owns the model: run model code here to compare like with like."""
        return self._thread

    @property
    def load_error(self) -> BaseException | None:
        """Why the model failed to load, if it did."""
        return self._load_error

    @property
    def engine_error(self) -> BaseException | None:
        """Why the engine loop died, if it did (the server then shuts down)."""
        return self._engine_error

    @property
    def exit_status(self) -> int:
        """0 after a clean run; 1 when the model could not load or the engine died."""
        return 1 if self._load_error is not None or self._engine_error is not None else 0

    @property
    def port(self) -> int:
        """The bound port (also after close, for logs and tests)."""
        assert self._port is not None, "the server is not started"
        return self._port

    @property
    def ws_url(self) -> str:
        return f"ws://{_url_host(self.config.host)}:{self.port}{WS_PATH}"

    @property
    def http_url(self) -> str:
        return f"http://{_url_host(self.config.host)}:{self.port}"

    # ------------------------------------------------------------------ 1. start

    async def start(self) -> None:
        """Bind the port, then load the model in the background."""
        self._check_config()
        self._ws_server = await serve(
            self._handle_connection,
            self.config.host,
            self.config.port,
            process_request=HttpFront(
                self.config, self.metrics, self.status, can_resume=self.resumes.valid
            ),
            compression=None,
            max_size=self.config.max_message_bytes,
            close_timeout=CLOSE_TIMEOUT,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
            # Frames read ahead per connection while its session is busy with one: each can
            # be max_message_bytes, so websockets' default of 16 would let one client park
            # 16 of them in server memory.
            max_queue=RECEIVE_QUEUE_FRAMES,
            server_header=f"latentcast/{__version__}",
        )
        self._port = int(next(iter(self._ws_server.sockets)).getsockname()[1])
        logger.info("listening on %s", self.ws_url)
        self._set_phase(Phase.LOADING)
        self._tasks.append(asyncio.create_task(self._load(), name="load-model"))
        self._tasks.append(asyncio.create_task(self._watch_stalled(), name="watch-stalled"))

    def _check_config(self) -> None:
        config = self.config
        if config.largest_result_bytes() > config.max_message_bytes:
            raise ValueError(
                f"max_message_bytes ({config.max_message_bytes}) is too small for the largest "
                f"result these limits allow (~{config.largest_result_bytes()} bytes): raise it "
                "or lower max_width / max_height / max_images"
            )

    async def _load(self) -> None:
        if self.config.ray_engines:
            await self._start_ray_engines()
        else:
            await self._start_local_engine()

    def _load_failed(self, exc: BaseException) -> None:
        self._load_error = exc
        self._stop_requested.set()

    async def _start_local_engine(self) -> None:
        config = self.config
        names = ", ".join(repr(spec.name) for spec in config.models)
        logger.info(
            "loading models %s on device %r (at most %d loaded at once)",
            names,
            config.device,
            config.resident_models,
        )
        started = time.monotonic()
        models = ModelSet(config, self._thread, self.scheduler, self.metrics)
        self._models = models
        try:
            # On the engine thread, like all torch work (see below).
            device = await self._thread.call(resolve_device, config.device)
            max_batch = config.max_batch or default_max_batch(device.type)
            engine = await LocalEngine.start(self._thread, models, max_batch)
        except Exception as exc:  # noqa: BLE001 - reported, and the server stops
            failed = models.starting
            logger.error("could not load model %r: %s", failed.name if failed else names, exc)
            self._load_failed(exc)
            return
        if device.type == "cpu":
            # Set on the engine thread itself, also to the default: torch's thread count
            # is per thread, and this is the one that runs the model. Without
            # --cpu-threads: the count torch chose for this process (one per physical
            # core), the speed of the pipeline called directly.
            threads = config.cpu_threads or await self._thread.call(torch.get_num_threads)
            await self._thread.call(torch.set_num_threads, threads)
            logger.info("engine uses %d CPU threads", threads)
        # The cores and the models' facts are made on the engine thread, like all torch
        # work (the facts build every scheduler). One parallel torch op on this (the
        # loop's) thread would give it an OpenMP thread pool of its own for good, and with
        # more OpenMP threads than cores libgomp stops spin-waiting: every parallel op of
        # the engine would then pay futex wake-ups (measured: the (e) job 2.1-2.8 s instead
        # of 1.5-1.8 s on 2 cores).
        logger.info(
            "%d models ready in %.1f s; loaded: %s",
            len(config.models),
            time.monotonic() - started,
            ", ".join(repr(name) for name in models.resident),
        )
        self._serve_engine(engine)

    async def _start_ray_engines(self) -> None:
        """Join or start Ray, then start the engine actors; serve each as it is ready.

        The first engine ready makes the server ready; one that cannot load its model is
        logged and left out, and only when none can is that a failed load.
        """
        config = self.config
        try:
            from .engine.ray_engine import RayEngine, RayRuntime
        except ImportError as exc:
            message = f"--engines needs Ray: pip install 'latentcast[ray]' ({exc})"
            logger.error("%s", message)
            self._load_failed(RuntimeError(message))
            return
        runtime = RayRuntime(config)
        try:
            await asyncio.to_thread(runtime.start)
        except Exception as exc:  # noqa: BLE001 - reported, and the server stops
            if config.ray_address is None:
                logger.error("could not start a local Ray runtime: %s", exc)
            else:
                logger.error(
                    "could not join the Ray cluster at %s: %s (is it running and reachable? a "
                    "cluster with token authentication also needs RAY_AUTH_MODE=token and its "
                    "token here: docs/deploy.md)",
                    config.ray_address,
                    exc,
                )
            self._load_failed(exc)
            return
        self._ray = runtime
        gpus = runtime.gpus_per_engine()
        count = config.ray_engines
        logger.info(
            "starting %d engines (model %r, %s GPU each)",
            count,
            config.default_model.name,
            gpus or "no",
        )

        async def start_engine(name: str) -> RayEngine:
            try:
                return await RayEngine.start(name, config, gpus=gpus)
            except Exception:
                # Left out for good (its actor is ended): /metrics says it is not alive.
                self.metrics.engine_alive.labels(engine=name).set(0)
                raise

        starts = [asyncio.create_task(start_engine(f"ray-{index}")) for index in range(count)]
        errors: list[Exception] = []
        try:
            for started in asyncio.as_completed(starts):
                try:
                    engine = await started
                except Exception as exc:  # noqa: BLE001 - one engine less; said in the log
                    logger.error("an engine could not start: %s", exc)
                    errors.append(exc)
                    continue
                self._serve_engine(engine)
        finally:
            for start in starts:  # closed while engines were still loading
                start.cancel()
        if len(errors) == count:
            logger.error("could not load model %r on any engine", config.default_model.name)
            self._load_failed(errors[0])

    def _serve_engine(self, engine: EngineHandle) -> None:
        """Start the engine loop of ``engine``; the first one makes the server ready."""
        batching = engine.policy.max_batch > 1
        models = self._models
        if self._context is None:
            every = (
                [models.facts_of(name) for name in models.names]
                if models is not None
                else [engine.facts]
            )
            self._context = self._session_context(every, batching=batching)
            if self.config.resident_models == len(self.config.models):
                # Everything loaded so far (torch, diffusers, the model's modules) lives as
                # long as the process: out of the collector's sight, a full collection no
                # longer walks it. Measured (bench_engines.py (c), 1,000 sessions): full
                # collections of 270-350 ms, 35-105 ms frozen, each a stall of every
                # session. Not when models come and go: an unloaded model must be
                # collectable.
                gc.freeze()
        logger.info(
            "engine %s batches up to %d UNet rows per step", engine.name, engine.policy.max_batch
        )
        worker = EngineWorker(
            engine,
            self.scheduler,
            self._encoder,
            self.metrics,
            peers=lambda: self._workers,
            models=models,
        )
        self._workers.append(worker)
        engine_loop = asyncio.create_task(worker.run(), name=f"engine-loop-{engine.name}")
        engine_loop.add_done_callback(self._engine_loop_ended)
        self._tasks.append(engine_loop)
        if self.phase is Phase.LOADING:
            self._set_phase(Phase.READY)
            self._ready.set()

    def _engine_loop_ended(self, task: asyncio.Task[None]) -> None:
        """The engine loop only ends when close() cancels it; anything else is fatal.

        As vLLM's EngineDeadError: said at once and to everyone. Every unfinished job ends
        with ``error{internal}``, /ready turns 503 and the server shuts down (exit status 1).
        """
        if task.cancelled() or self.phase is Phase.CLOSED:
            return
        error = task.exception() or RuntimeError("the engine loop returned")
        self._engine_error = error
        logger.critical(
            "the engine loop died (%s: %s): ending %d unfinished jobs and shutting down",
            type(error).__name__,
            error,
            len(self.scheduler.unfinished),
            exc_info=error,
        )
        message = f"the engine stopped ({type(error).__name__}: {error}); the server is exiting"
        for job in sorted(self.scheduler.unfinished, key=lambda job: job.seq):
            job.end(Error(id=job.id, code=ErrorCode.INTERNAL, message=message))
        self.request_stop()

    def _session_context(self, every: list[ModelFacts], *, batching: bool) -> SessionContext:
        """What sessions share; ``every`` model's facts, the default first."""
        controls = any(facts.controlnets for facts in every)
        limits = self.config.limits().model_copy(
            update={"max_controls": MAX_CONTROLS_PER_JOB if controls else 0}
        )
        models = {facts.name: self._model_context(facts) for facts in every}
        default = models[every[0].name]
        features = ("batching",) if batching else ()
        if len(models) > 1:
            features += ("models",)
        if controls:
            features += ("controls",)
        features += ("resume",)
        return SessionContext(
            config=self.config,
            server_name=f"latentcast/{__version__}",
            rules=SubmitRules(
                limits=limits,
                schedulers=every[0].schedulers,
                loras=every[0].loras,
                controlnets=every[0].controlnets,
                models={
                    facts.name: ModelRules(
                        schedulers=facts.schedulers,
                        loras=facts.loras,
                        controlnets=facts.controlnets,
                    )
                    for facts in every
                },
            ),
            defaults=default.defaults,
            model=default.info,
            scheduler=self.scheduler,
            metrics=self.metrics,
            is_draining=lambda: not self._accepting(),
            image_previews=default.image_previews,
            scheduler_step_limits=default.scheduler_step_limits,
            features=features,
            models=models,
            resumes=self.resumes,
        )

    def _model_context(self, model: ModelFacts) -> ModelContext:
        config = self.config
        latent_rgb = model.latent_rgb
        info = ModelInfo(
            name=model.name,
            family=model.family,
            modes=list(model.modes),
            schedulers=list(model.schedulers),
            loras=list(model.loras),
            controlnets=list(model.controlnets),
            latent_channels=model.latent_channels,
            vae_scale_factor=model.vae_scale_factor,
            latent_rgb=(
                LatentRGBInfo(factors=list(latent_rgb.factors), bias=latent_rgb.bias)
                if latent_rgb is not None
                else None
            ),
        )
        limits = config.limits()
        return ModelContext(
            info=info,
            defaults=Defaults(
                width=min(model.default_size, limits.max_width),
                height=min(model.default_size, limits.max_height),
                steps=min(20, limits.max_steps),
                guidance_scale=7.5,
                scheduler=model.default_scheduler,
            ),
            image_previews=model.image_previews,
            scheduler_step_limits=model.step_limits,
        )

    async def wait_ready(self) -> None:
        """Until the model is loaded; raises if loading failed."""
        ready = asyncio.create_task(self._ready.wait())
        stopped = asyncio.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait([ready, stopped], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            stopped.cancel()
        if self._load_error is not None:
            raise RuntimeError(f"model failed to load: {self._load_error}") from self._load_error
        if not self._ready.is_set():
            raise RuntimeError("the server stopped before the model was loaded")

    # ------------------------------------------------------------------ 2. serve

    async def _handle_connection(self, connection: ServerConnection) -> None:
        context = self._context
        wish = ResumeRequest.from_path(connection.request.path if connection.request else "")
        # While draining, a resume is let through (its jobs' last messages are waiting).
        resuming = wish.token is not None and self.phase is Phase.DRAINING
        if context is None or not (self._accepting() or resuming):
            # Checked at the handshake too; this covers a phase change in between.
            await connection.close(CloseCode.GOING_AWAY, "server not ready")
            return
        session = await self._resume(wish, connection) if wish.token is not None else None
        resumed_after = wish.after if session is not None else None
        if session is None:
            if not self._accepting():
                await connection.close(CloseCode.GOING_AWAY, "server not ready")
                return
            session = Session(
                connection, context, resumable=wish.resumable or wish.token is not None
            )
        self.sessions.add(session)
        self.metrics.connections.set(len(self.sessions))
        try:
            await session.run(resumed_after=resumed_after)
        finally:
            # A resumed session may already serve a newer connection.
            if session.connection is connection:
                self.sessions.discard(session)
            self.metrics.connections.set(len(self.sessions))

    async def _resume(self, wish: ResumeRequest, connection: ServerConnection) -> Session | None:
        """The session ``wish`` takes over, attached to ``connection``; None when the token
        is unknown or void or ``after`` is not one the session can serve (its old session
        then ends: the client, told ``resumed:false``, knows its jobs are gone)."""
        assert wish.token is not None
        session = self.resumes.claim(wish.token)
        if session is None:
            return None
        await session.take_over()
        replay = session.replay
        if replay is None or wish.after is None or not replay.covers(wish.after):
            logger.info(
                "session=%s resume refused: after=%s is not a seq it can resume from "
                "(last %d): ending it",
                session.id,
                wish.after,
                replay.last_seq if replay is not None else 0,
            )
            session.expire()
            return None
        session.attach(connection)
        self.metrics.resumes.inc()
        return session

    async def _watch_stalled(self) -> None:
        """Disconnect sessions that have not read within the send timeout."""
        interval = min(1.0, self.config.send_timeout / 4)
        closing: set[asyncio.Task[None]] = set()
        while True:
            await asyncio.sleep(interval)
            for session in list(self.sessions):
                if session.stalled() and not session.buffer.closed:
                    task = asyncio.create_task(session.close_stalled())
                    closing.add(task)
                    task.add_done_callback(closing.discard)

    def request_stop(self) -> None:
        """Begin the drain (first call) or move its deadline to now (later calls)."""
        now = time.monotonic()
        if self._first_stop_at is None:
            self._first_stop_at = now
        self._last_stop_at = now
        if self._stop_requested.is_set():
            self._deadline_now.set()
        self._stop_requested.set()

    def exit_deadline(self) -> float | None:
        """When the process must be gone (time.monotonic()), once a stop was requested.

        PROTOCOL.md section 7: the drain timeout + 6 s after the first signal, 6 s after a
        later one, whichever comes first.
        """
        if self._first_stop_at is None or self._last_stop_at is None:
            return None
        deadline = self._first_stop_at + self.config.drain_timeout + EXIT_BOUND
        if self._last_stop_at > self._first_stop_at:  # a second signal
            deadline = min(deadline, self._last_stop_at + EXIT_BOUND)
        return deadline

    async def wait_stop_requested(self) -> None:
        await self._stop_requested.wait()

    # ------------------------------------------------------------------ 3. drain

    async def drain(self) -> None:
        """Shut down as PROTOCOL.md section 7 says. Safe to call in any phase."""
        if self.phase in (Phase.DRAINING, Phase.CLOSED):
            return
        timeout = self.config.drain_timeout
        self._set_phase(Phase.DRAINING)
        sessions = list(self.sessions)
        logger.info(
            "draining: %d sessions, %d unfinished jobs, deadline in %.0f s",
            len(sessions),
            len(self.scheduler.unfinished),
            timeout,
        )
        for session in [*sessions, *self.resumes.detached_sessions()]:
            session.send(Draining(deadline_ms=round(timeout * 1000)))
        idle = asyncio.create_task(self.scheduler.wait_idle())
        now = asyncio.create_task(self._deadline_now.wait())
        try:
            await asyncio.wait([idle, now], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            idle.cancel()
            now.cancel()
        if self.scheduler.unfinished:
            logger.warning(
                "drain deadline: ending %d unfinished jobs with error shutdown",
                len(self.scheduler.unfinished),
            )
            self.scheduler.shutdown()
        await asyncio.gather(
            *(
                session.close(
                    CloseCode.GOING_AWAY,
                    "server shutting down",
                    flush_timeout=self.config.close_grace,
                )
                for session in list(self.sessions)
            ),
            return_exceptions=True,
        )
        # Detached sessions that were not resumed in time end with the server.
        self.resumes.close()
        logger.info("drained")

    # ------------------------------------------------------------------ 4. close

    async def close(self, engine_timeout: float = ENGINE_STOP_TIMEOUT) -> bool:
        """Stop everything; True when the engine thread (and the model loader) ended. Idempotent.

        drain() first for a graceful stop. Waits up to ``engine_timeout`` for the engine
        thread to leave a stopped job (it checks at every step boundary); a process that
        must exit on time passes what is left of its exit bound.
        """
        if self.phase is Phase.CLOSED:
            return not self._thread.alive
        self._set_phase(Phase.CLOSED)
        self.resumes.close()  # no expiry timer outlives the server (drain() did it already)
        if self._ws_server is not None:
            # drain() closed every session; what remains are connections still in their
            # handshake (refused with 503 from now on) and sessions drain() never saw.
            self._ws_server.close(close_connections=True)
            try:
                async with asyncio.timeout(SERVER_CLOSE_TIMEOUT):
                    await self._ws_server.wait_closed()
            except TimeoutError:
                for connection in self._ws_server.connections:
                    connection.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._models is not None:
            await self._models.close()
        self._encoder.shutdown(wait=False, cancel_futures=True)
        if self._ray is not None:
            # Our actors end with the connection; a runtime started here ends with them.
            # Bounded: a process that must exit on time does not wait for Ray.
            stopping = asyncio.ensure_future(asyncio.to_thread(self._ray.stop))
            try:
                async with asyncio.timeout(max(0.1, min(RAY_STOP_TIMEOUT, engine_timeout))):
                    await asyncio.shield(stopping)
            except TimeoutError:
                logger.warning("ray did not shut down within %.1f s", RAY_STOP_TIMEOUT)
        # A job stopped at the deadline leaves the engine at its next step boundary.
        self._thread.close()
        deadline = time.monotonic() + max(0.0, engine_timeout)
        if not await asyncio.to_thread(self._thread.join, max(0.0, engine_timeout)):
            logger.warning("the engine thread is still inside a step after %.1f s", engine_timeout)
            return False
        # A model load in progress (several models) ends on its own thread.
        models = self._models
        left = max(0.0, deadline - time.monotonic())
        if models is not None and not await asyncio.to_thread(models.join_loader, left):
            logger.warning("the model loader is still loading after %.1f s", engine_timeout)
            return False
        return True

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.drain()
        await self.close()


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


async def run(config: ServerConfig) -> int:
    """Serve until SIGTERM or SIGINT, drain, and return the process exit status.

    A model that cannot be loaded ends the server at once with status 1 (nothing was
    served, so there is nothing to drain).
    """
    server = Server(config)
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        # Only record and wake: the lifecycle below does the work.
        logger.info("received %s", signal.Signals(signum).name)
        server.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await server.start()
        await server.wait_stop_requested()
        if server.load_error is None:
            await server.drain()
    finally:
        deadline = server.exit_deadline()
        engine_timeout = (
            ENGINE_STOP_TIMEOUT if deadline is None else deadline - EXIT_MARGIN - time.monotonic()
        )
        if not await server.close(engine_timeout=engine_timeout):
            logger.warning("exiting while the engine thread is still inside a step")
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return server.exit_status


def run_and_exit(config: ServerConfig) -> NoReturn:
    """Run the server in this process, then end the process at once with its status.

    ``os._exit`` rather than a normal interpreter exit: tearing down torch, diffusers and
    transformers takes seconds after the server is done, and an engine thread still
    inside a step at that moment makes the runtime abort (SIGABRT). Logs and standard
    streams are flushed first; nothing else in this process holds data to save.
    """
    status = asyncio.run(run(config))
    logger.info("exiting with status %d", status)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
