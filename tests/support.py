"""A bare test client over a real WebSocket, speaking through latentcast.protocol only.

Deliberately thin (no retries, no convenience beyond reading typed messages) so that the
integration tests see exactly what the server sends.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import msgpack
from pydantic import BaseModel
from websockets.asyncio.client import ClientConnection, connect

from latentcast.protocol import (
    TERMINAL_ERROR_CODES,
    TERMINAL_TYPES,
    GenerationParams,
    PreviewRequest,
    Submit,
    Welcome,
    decode_server_message,
    encode_message,
)

TIMEOUT = 60.0

#: A job that runs until it is stopped, on any machine: 150 steps (the default
#: max_steps) at 256x256 take the tiny model many seconds even on a fast CPU with every
#: core, while each step stays short (so a stop still takes effect within a fraction of a
#: second). At the tiny model's default 64x64, 150 steps can end within a second.
LONG_JOB: dict[str, int] = {"steps": 150, "width": 256, "height": 256}

#: Server options under which a job submitted while another runs WAITS in the queue: the
#: engine runs one job at a time (``--max-batch 1``). By default jobs share the engine
#: (step batching), so a second job joins the running one at the next step instead; a
#: test of queueing itself (positions, cancelling or replacing a waiting job, queue
#: limits, start order) runs with these.
ONE_AT_A_TIME: dict[str, int] = {"max_batch": 1}

#: The largest per-channel difference (0-255) between a job's image when it shared UNet
#: calls with other jobs and its image alone: batched arithmetic rounds differently in
#: the last bits (PROTOCOL.md 5.8). Measured: at most 1 on the tiny models.
BATCH_ROUNDING = 2


class _Sender:
    """Sending, shared by :class:`Client` and :class:`StalledClient`."""

    ws: ClientConnection

    async def send(self, message: BaseModel | dict[str, Any] | bytes | str) -> None:
        if isinstance(message, BaseModel):
            await self.ws.send(encode_message(message))
        elif isinstance(message, dict):
            await self.ws.send(msgpack.packb(message, use_bin_type=True))
        else:
            await self.ws.send(message)

    async def submit(self, job_id: str, prompt: str = "a cat", **params: Any) -> None:
        """``preview`` (a dict) and ``replaces`` go on the submit, the rest into params."""
        preview = params.pop("preview", None)
        replaces = params.pop("replaces", None)
        params.setdefault("steps", 2)
        await self.send(
            Submit(
                id=job_id,
                params=GenerationParams(prompt=prompt, **params),
                preview=PreviewRequest(**preview) if preview else PreviewRequest(),
                replaces=replaces,
            )
        )


@dataclass
class Client(_Sender):
    ws: ClientConnection
    welcome: Welcome
    received: list[Any] = field(default_factory=list)
    #: (monotonic receive time, message), to order what two clients read concurrently.
    timeline: list[tuple[float, Any]] = field(default_factory=list)

    async def recv(self, timeout: float = TIMEOUT) -> Any:
        async with asyncio.timeout(timeout):
            message = decode_server_message(await self.ws.recv())
        self.received.append(message)
        self.timeline.append((time.monotonic(), message))
        return message

    async def recv_until(
        self, predicate: Callable[[Any], bool], timeout: float = TIMEOUT
    ) -> list[Any]:
        """Messages up to and including the first that matches ``predicate``."""
        got = []
        async with asyncio.timeout(timeout):
            while True:
                message = await self.recv()
                got.append(message)
                if predicate(message):
                    return got

    async def ended(self, job_id: str, timeout: float = TIMEOUT) -> Any:
        """The terminal message of ``job_id``: one received already, or the next."""
        for message in self.received:
            if is_terminal(message, job_id):
                return message
        return (await self.recv_until(lambda m: is_terminal(m, job_id), timeout))[-1]

    async def job_messages(self, job_id: str, timeout: float = TIMEOUT) -> list[Any]:
        """Every message about ``job_id`` up to its terminal one (others are kept)."""
        got = await self.recv_until(lambda m: is_terminal(m, job_id), timeout)
        return [m for m in got if getattr(m, "id", None) == job_id]

    async def close(self) -> None:
        await self.ws.close()


def is_terminal(message: Any, job_id: str | None = None) -> bool:
    if message.type not in TERMINAL_TYPES:
        return False
    if message.type == "error" and (message.id is None or message.code not in TERMINAL_ERROR_CODES):
        return False
    return job_id is None or message.id == job_id


async def open_client(url: str, **connect_args: Any) -> Client:
    ws = await connect(url, compression=None, max_size=None, **connect_args)
    welcome = decode_server_message(await ws.recv())
    assert isinstance(welcome, Welcome)
    return Client(ws, welcome)


# ---------------------------------------------------------------------- stalled clients


@dataclass
class StalledClient(_Sender):
    """A connected client that does not read: see :func:`open_stalled_client`.

    ``ws`` sends as usual (the client-to-server direction is never blocked); nothing reads
    what the server sends until :meth:`resume` is called. ``session`` is the server's
    ``Session`` of this connection, to watch its buffer (``session.buffer``) from a test.
    """

    ws: ClientConnection
    session: Any
    #: The client socket's local address: what the server sees as the peer.
    address: tuple[str, int]

    async def submit(self, job_id: str, prompt: str = "noise", **params: Any) -> None:
        params.setdefault("steps", 1)
        await super().submit(job_id, prompt, **params)

    async def resume(self) -> Client:
        """Start reading: a :class:`Client` on the same connection (welcome read first).

        Its ``recv`` sees everything the server buffered meanwhile, in order.
        """
        welcome = decode_server_message(await asyncio.wait_for(self.ws.recv(), TIMEOUT))
        assert isinstance(welcome, Welcome)
        return Client(self.ws, welcome)

    async def close(self) -> None:
        """Drop the connection at once (a TCP reset), as a client that vanished would.

        A polite close could not finish: the server's close frame waits behind what this
        client never read, so websockets would wait its close timeout (10 s) first. To
        close politely, :meth:`resume` and close that :class:`Client` instead.
        """
        self.ws.transport.abort()
        await self.ws.wait_closed()


async def wait_for(predicate: Callable[[], object], timeout: float = TIMEOUT) -> None:
    """Poll ``predicate`` (a cheap check of server state) until true; fail after ``timeout``."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def open_stalled_client(
    server: Any, *, rcvbuf: int = 4096, server_sndbuf: int | None = 4096, query: str = ""
) -> StalledClient:
    """Connect to ``server`` (a started ``latentcast.server.app.Server``) and never read.

    Made so that a few tens of kilobytes of unread messages really block the server's
    writer for this connection, whatever the machine's socket defaults:

    * the client socket gets ``SO_RCVBUF=rcvbuf`` before it connects (so the TCP window
      is small from the start), and the websockets client buffers at most about one
      message before it stops reading the socket (``max_queue=1``);
    * the server's side of this one connection gets ``SO_SNDBUF=server_sndbuf`` (None
      leaves it alone), which turns off the kernel's send-buffer autotuning, otherwise
      able to absorb megabytes on loopback.

    What it takes to stall: the asyncio transport's own buffer on the server (websockets'
    ``write_limit``, 32 KiB) plus both kernel buffers (the kernel doubles the values
    given) plus about one message on the client side; in practice under ~100 KB. So one
    ``complete`` of four 128x128 PNGs (~200 KB of noise) leaves the writer blocked on it
    for as long as nobody reads, and every message put after it waits in the session's
    ``OutboundBuffer``: non-droppable ones count in ``session.buffer.reliable_backlog``
    (and age towards the send timeout), droppable ones coalesce (latest wins).

    The stall is a state, not a timing: wait for it with :func:`wait_for` on
    ``client.session.buffer.reliable_backlog`` (and, to be sure the writer is stuck on a
    big message, on that message's job having ended), never with a sleep.

    ``query`` goes on the URL (``"?resumable=1"``).
    """
    import socket

    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", server.port))
        address = sock.getsockname()[:2]
        ws = await connect(
            server.ws_url + query, sock=sock, max_queue=1, compression=None, max_size=None
        )
    except BaseException:
        sock.close()
        raise

    def this_session() -> Any:
        for session in list(server.sessions):
            peer = session.connection.remote_address
            if peer is not None and tuple(peer[:2]) == address:
                return session
        return None

    await wait_for(lambda: this_session() is not None)
    session = this_session()
    if server_sndbuf is not None:
        server_sock = session.connection.transport.get_extra_info("socket")
        server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_sndbuf)
    return StalledClient(ws, session, address)


def ready_status(http_url: str) -> tuple[int, dict[str, Any]]:
    """GET /ready: the status and the JSON body (blocking: call it in a thread)."""
    try:
        with urllib.request.urlopen(http_url + "/ready", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


class EngineHold:
    """A call on the engine thread that blocks it until :meth:`release`.

    The engine thread runs its calls in order: a job's run queued after this one waits,
    one queued before it runs first. So jobs wait here whatever the machine's speed.
    """

    def __init__(self, server: Any) -> None:
        self._server = server
        self._release = threading.Event()
        self._task: asyncio.Future | None = None

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._server.engine_thread.call(self._release.wait, 120))
        await asyncio.sleep(0)  # the call is queued on the engine thread now

    async def release(self) -> None:
        self._release.set()
        if self._task is not None:
            await self._task


@asynccontextmanager
async def engine_hold(server: Any) -> AsyncIterator[EngineHold]:
    """Hold the engine thread for the ``async with`` block (see :class:`EngineHold`)."""
    hold = EngineHold(server)
    await hold.start()
    try:
        yield hold
    finally:
        await hold.release()


def largest_difference(png_a: bytes, png_b: bytes) -> int:
    """The largest per-channel difference (0-255) between two encoded images of one size."""
    import io

    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(io.BytesIO(png_a)).convert("RGB"), dtype=np.int16)
    b = np.asarray(Image.open(io.BytesIO(png_b)).convert("RGB"), dtype=np.int16)
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a - b).max())


def metric_samples(server: Any, histogram: str) -> dict[str, float]:
    """A Prometheus histogram's ``sum`` and ``count`` from ``server``'s metrics."""
    values = {}
    for line in server.metrics.render().decode().splitlines():
        for part in ("sum", "count"):
            if line.startswith(f"{histogram}_{part} "):
                values[part] = float(line.split()[-1])
    return values


# ---------------------------------------------------------------------- guarantees

#: A job's states in the order PROTOCOL.md 5.3 allows; a state may only move forward.
_JOB_ORDER = {"accepted": 0, "queued": 1, "started": 2, "progress": 3, "preview": 3}


def check_guarantees(
    submitted: list[str], messages: list[Any], *, all_ended: bool = True, seq: bool = False
) -> None:
    """Assert guarantees 1-3 of PROTOCOL.md section 5 over what one session received.

    ``submitted``: the ids of the session's submits, in order. ``messages``: everything
    received, in order (``welcome`` messages, one per connection, are skipped), e.g. the
    concatenation over the connections of a resumed session. 1: exactly one
    ``accepted`` or (non-terminal) ``error`` per submit, in the order of the submits.
    2: exactly one terminal message per accepted job (when ``all_ended``), nothing about
    the job after it. 3: accepted, queued*, started, (progress|preview)*, terminal.
    ``seq``: every message carries a seq, strictly increasing.
    """
    body = [m for m in messages if m.type != "welcome"]
    if seq:
        seqs = [m.seq for m in body]
        assert all(isinstance(s, int) for s in seqs), f"a message without seq: {seqs}"
        assert all(a < b for a, b in itertools.pairwise(seqs)), f"seq order: {seqs}"
    answers = [
        m.id
        for m in body
        if m.type == "accepted"
        or (
            m.type == "error"
            and m.id is not None
            and m.code not in TERMINAL_ERROR_CODES
            and m.code != "unknown_job"
        )
    ]
    assert answers == submitted, f"answers {answers} for submits {submitted}"
    state: dict[str, str] = {}  # job id -> the last message type of its current job
    for index, message in enumerate(body):
        job_id = getattr(message, "id", None)
        where = f"message {index} ({message.type} {job_id})"
        if message.type == "accepted":
            assert state.get(job_id, "ended") == "ended", f"{where}: id still unfinished"
            state[job_id] = "accepted"
        elif message.type in _JOB_ORDER:
            last = state.get(job_id, "ended")
            assert last != "ended", f"{where}: about a job that is not (or no longer) running"
            assert _JOB_ORDER[last] <= _JOB_ORDER[message.type], f"{where} after {last}"
            if message.type in ("progress", "preview"):
                assert last != "accepted" and last != "queued", f"{where} before started"
            if message.type == "started":
                assert last in ("accepted", "queued"), f"{where} after {last}"
            state[job_id] = message.type
        elif is_terminal(message):
            assert state.get(job_id, "ended") != "ended", f"{where}: a second terminal"
            state[job_id] = "ended"
    if all_ended:
        unfinished = sorted(job for job, last in state.items() if last != "ended")
        assert not unfinished, f"jobs without a terminal message: {unfinished}"


# ---------------------------------------------------------------------- a TCP relay


class TcpRelay:
    """A relay on 127.0.0.1 in front of a server's port, to lose connections at will.

    ``url(server_url)`` is the server's URL through the relay. :meth:`drop` resets every
    relayed connection at once on both sides (no close frame: the network went away), or
    only on the client's side (``half_open``: the server's side stays open and silent, as
    when a phone leaves a network); :meth:`stop` also stops listening, so that connecting
    again is refused.
    """

    def __init__(self, target_port: int) -> None:
        self._target_port = target_port
        self._listener: asyncio.Server | None = None
        #: (client side, server side) of each relayed connection.
        self._writers: list[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = []
        #: Server sides left half-open (held here: a StreamWriter closes when collected).
        self._silent: list[asyncio.StreamWriter] = []
        self._pipes: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> None:
        self._listener = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._listener.sockets[0].getsockname()[1]

    def url(self, server_url: str) -> str:
        return server_url.replace(f":{self._target_port}/", f":{self.port}/", 1)

    def drop(self, *, half_open: bool = False) -> None:
        for client_side, server_side in self._writers:
            if half_open:
                self._silent.append(server_side)
            client_side.transport.abort()
            if not half_open:
                server_side.transport.abort()
        self._writers.clear()

    async def stop(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.drop()
        for writer in self._silent:
            writer.transport.abort()
        for pipe in list(self._pipes):
            pipe.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection(
            "127.0.0.1", self._target_port
        )
        self._writers.append((writer, upstream_writer))
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            pipe = asyncio.create_task(self._pipe(source, sink))
            self._pipes.add(pipe)
            pipe.add_done_callback(self._pipes.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if sink not in self._silent:
                sink.transport.abort()
