"""The server's lifecycle, as explicit steps: start, serve, drain, close.

::

    start()   bind the port (HTTP answers from now on; /ready says "loading"),
              then load the model on the engine thread and start the engine loop
    serve     until stop is requested (SIGTERM / SIGINT, or request_stop())
    drain()   PROTOCOL.md section 7: refuse new work, tell every session, let jobs end
              until the deadline, then end the rest with error{shutdown}, give each
              connection a short grace to read, close with 1001
    close()   stop the engine loop and the threads; idempotent

:func:`run` wires these to signals: a handler only records the signal and wakes the
loop; a second one moves the drain deadline to now.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import Self

import torch
from websockets.asyncio.server import Server as WebSocketServer
from websockets.asyncio.server import ServerConnection, serve
from websockets.frames import CloseCode

from latentcast.protocol import Defaults, Draining, LatentRGBInfo, ModelInfo, SubmitRules

from . import __version__
from .config import ServerConfig
from .engine import Engine, EngineThread, EngineWorker
from .metrics import Metrics
from .models import LoadedModel, load_model
from .scheduler import Scheduler
from .session import Session, SessionContext
from .transport import WS_PATH, HttpFront, ServerStatus

logger = logging.getLogger("latentcast.server")

CLOSE_TIMEOUT = 5.0
#: How long close() waits for the engine thread to leave a stopped job (or a model load).
ENGINE_STOP_TIMEOUT = 30.0


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
        self.sessions: set[Session] = set()
        self.model: LoadedModel | None = None
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

    # ------------------------------------------------------------------ state

    def _set_phase(self, phase: Phase) -> None:
        logger.debug("phase %s -> %s", self.phase.value, phase.value)
        self.phase = phase

    def status(self) -> ServerStatus:
        reason = {Phase.READY: None, Phase.DRAINING: "draining", Phase.CLOSED: "draining"}.get(
            self.phase, "loading"
        )
        return ServerStatus(
            ready=self.phase is Phase.READY,
            reason=reason,
            at_connection_limit=len(self.sessions) >= self.config.max_connections,
        )

    @property
    def engine_thread(self) -> EngineThread:
        """The thread that owns the model: run model code here to compare like with like."""
        return self._thread

    @property
    def load_error(self) -> BaseException | None:
        """Why the model failed to load, if it did."""
        return self._load_error

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
            process_request=HttpFront(self.config, self.metrics, self.status),
            compression=None,
            max_size=self.config.max_message_bytes,
            close_timeout=CLOSE_TIMEOUT,
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
        config = self.config
        logger.info("loading model %r on device %r", config.model, config.device)
        started = time.monotonic()
        try:
            model = await self._thread.call(
                load_model,
                config.model,
                device=config.device,
                dtype=config.dtype,
                cache_dir=config.cache_dir,
                model_config=config.checkpoint_config,
                loras=config.lora_paths(),
                preview_decoder=config.preview_decoder,
            )
        except Exception as exc:  # noqa: BLE001 - reported, and the server stops
            logger.error("could not load model %r: %s", config.model, exc)
            self._load_error = exc
            self._stop_requested.set()
            return
        if model.device.type == "cpu":
            threads = config.cpu_threads or max(1, (os.cpu_count() or 1) - 1)
            await self._thread.call(torch.set_num_threads, threads)
            logger.info("engine uses %d CPU threads", threads)
        self.model = model
        self._context = self._session_context(model)
        engine = Engine(model)
        worker = EngineWorker(engine, self._thread, self.scheduler, self._encoder, self.metrics)
        self._tasks.append(asyncio.create_task(worker.run(), name="engine-loop"))
        logger.info(
            "model %r loaded in %.1f s (family %s, %s, %s)",
            model.name,
            time.monotonic() - started,
            model.family.name,
            model.device,
            str(model.dtype).removeprefix("torch."),
        )
        if self.phase is Phase.LOADING:
            self._set_phase(Phase.READY)
            self._ready.set()

    def _session_context(self, model: LoadedModel) -> SessionContext:
        config = self.config
        latent_rgb = model.family.latent_rgb
        info = ModelInfo(
            name=model.name,
            family=model.family.name,
            modes=list(model.modes),
            schedulers=list(model.schedulers),
            loras=list(model.loras),
            latent_channels=model.latent_channels,
            vae_scale_factor=model.vae_scale_factor,
            latent_rgb=(
                LatentRGBInfo(factors=list(latent_rgb.factors), bias=latent_rgb.bias)
                if latent_rgb is not None
                else None
            ),
        )
        limits = config.limits()
        return SessionContext(
            config=config,
            server_name=f"latentcast/{__version__}",
            rules=SubmitRules(limits=limits, schedulers=model.schedulers, loras=model.loras),
            defaults=Defaults(
                width=min(model.default_size, limits.max_width),
                height=min(model.default_size, limits.max_height),
                steps=min(20, limits.max_steps),
                guidance_scale=7.5,
                scheduler=model.default_scheduler,
            ),
            model=info,
            scheduler=self.scheduler,
            metrics=self.metrics,
            is_draining=lambda: self.phase is not Phase.READY,
            image_previews=latent_rgb is not None or model.preview_decoder is not None,
            scheduler_step_limits={
                name: limit
                for name in model.schedulers
                if (limit := model.scheduler_step_limit(name)) is not None
            },
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
        if context is None or self.phase is not Phase.READY:
            # Checked at the handshake too; this covers a phase change in between.
            await connection.close(CloseCode.GOING_AWAY, "server not ready")
            return
        session = Session(connection, context)
        self.sessions.add(session)
        self.metrics.connections.set(len(self.sessions))
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            self.metrics.connections.set(len(self.sessions))

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
        if self._stop_requested.is_set():
            self._deadline_now.set()
        self._stop_requested.set()

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
        for session in sessions:
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
        logger.info("drained")

    # ------------------------------------------------------------------ 4. close

    async def close(self) -> None:
        """Stop everything. Idempotent; drain() first for a graceful stop."""
        if self.phase is Phase.CLOSED:
            return
        self._set_phase(Phase.CLOSED)
        if self._ws_server is not None:
            self._ws_server.close(close_connections=True)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT + 1):
                    await self._ws_server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # A job stopped at the deadline leaves the engine within one step; wait for that,
        # so the process never exits with torch still running on the engine thread.
        self._thread.close()
        if not await asyncio.to_thread(self._thread.join, ENGINE_STOP_TIMEOUT):
            logger.warning("the engine thread is still busy; exiting without it")
        self._encoder.shutdown(wait=False, cancel_futures=True)

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
    """Serve until SIGTERM or SIGINT, drain, and return the process exit status."""
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
        await server.drain()
    finally:
        await server.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    if server.load_error is not None:
        return 1
    return 0
