"""No frame, whatever it holds, stalls other sessions (PROTOCOL.md section 1; issue 8).

Each hostile frame is sent by a client in a separate process (so that building and masking
a large frame never runs on the test's event loop, which is also the server's). Meanwhile
this process polls ``GET /health`` over fresh TCP connections and reads another session's
job progress, and records the worst gap between two answers: a stalled event loop shows
up as a gap. The hostile session must get the right error, the gaps must stay well under a
second (the goal is 100 ms; bench/bench_frames.py records the real figures), and the
server's peak RSS may grow by only a few times the frame's size.

Run as a script (``python tests/integration/test_hostile_frames.py URL KIND``), this file
is that client: it builds the frame of KIND, sends it and prints the answer as JSON.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgpack
import pytest

REPO = Path(__file__).resolve().parents[2]
MiB = 2**20
#: A stall longer than this fails the test (the goal is 100 ms; a loaded 2-core CI machine
#: needs the margin; the unbounded decoder stalled for 6-10 s).
MAX_GAP_S = 1.0
#: Peak RSS growth allowed: a few times the frame, plus slack for the allocator.
RSS_FACTOR = 4
RSS_SLACK = 96 * MiB


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def submit(params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "submit", "id": "hostile", "params": params, **extra}


def tree(leaf: Any, levels: int, width: int = 256) -> Any:
    """``levels`` nested lists, ``width`` wide, with ``leaf`` at the bottom."""
    value = leaf
    for _ in range(levels):
        value = [value] * width
    return value


def _default_max_message_bytes() -> int:
    """The server's default ``max_message_bytes``: what ``start_server()`` runs with."""
    from latentcast.server.config import ServerConfig

    default: int = ServerConfig.model_fields["max_message_bytes"].default
    return default


def _max_legal_init_image(max_message_bytes: int) -> bytes:
    frame = pack(submit({"prompt": "x", "init_image": b""}))
    # A bin32 header (5 bytes) where the empty bin had a bin8 header (2 bytes).
    return pack(
        submit({"prompt": "x", "init_image": b"\x00" * (max_message_bytes - len(frame) - 3)})
    )


#: kind -> (frame builder, expected error code, expected field or None)
HOSTILE: dict[str, tuple[Callable[[], bytes], str, str | None]] = {
    # issue 8's reproductions: a list of a million nils, a map of a million keys.
    "nil_loras": (
        lambda: pack(submit({"prompt": "x", "loras": [None] * 1_000_000})),
        "bad_frame",
        None,
    ),
    "unknown_keys": (
        lambda: pack(submit({"prompt": "x", **{f"k{i}": None for i in range(1_000_000)}})),
        "bad_frame",
        None,
    ),
    "deep_nesting": (lambda: b"\x91" * 1_000_000 + b"\xc0", "bad_frame", None),
    # Legal structure (no list or map over 256 entries, 3 levels deep), 16 M tiny objects:
    # an unknown key whose value would cost ~60 bytes of Python objects per frame byte.
    "wide_tree_of_maps": (
        lambda: pack(submit({"prompt": "x"}, junk=tree({}, 3))),
        "invalid_request",
        "junk",
    ),
    # 4 M small ints where params.loras goes: too many items, nothing else needs reading.
    "tiny_ints": (
        lambda: pack(submit({"prompt": "x", "loras": tree(7, 3)[:64]})),
        "invalid_request",
        "params.loras",
    ),
    "invalid_utf8_deep": (
        lambda: pack(submit({"prompt": "x"}, junk=tree("x", 2)))[:-2] + b"\xa1\xff",
        "bad_frame",
        None,
    ),
    "long_strings": (
        lambda: pack(
            {
                "type": "submit",
                "id": "i" * 2000,
                "replaces": "r" * 2000,
                "params": {
                    "prompt": "p" * 2000,
                    "negative_prompt": "n" * 2000,
                    "scheduler": "s" * 2000,
                    "loras": [{"name": "l" * 2000}] * 16,
                    "k" * 2000: "v" * 2000,
                },
            }
        ),
        "invalid_request",
        "id",
    ),
    # The largest legal frame at the server's default limit (32 MiB), nearly all of it one
    # init_image.
    "max_frame_bin": (
        lambda: _max_legal_init_image(_default_max_message_bytes()),
        "bad_image",
        None,
    ),
}


# --------------------------------------------------------------------------- the client


def _client_main(url: str, kind: str) -> None:
    """Send one hostile frame of ``kind`` and print the answer (runs in a subprocess)."""
    from websockets.sync.client import connect

    build, _, _ = HOSTILE[kind]
    frame = build()
    with connect(url, max_size=None, compression=None, open_timeout=60) as ws:
        ws.recv(timeout=60)  # welcome
        sent = time.monotonic()
        ws.send(frame)
        reply = msgpack.unpackb(ws.recv(timeout=300), raw=False)
        answered = time.monotonic()
    print(
        json.dumps(
            {
                "kind": kind,
                "bytes": len(frame),
                "code": reply.get("code"),
                "field": reply.get("field"),
                "message": str(reply.get("message"))[:200],
                "seconds": answered - sent,
            }
        ),
        flush=True,
    )


async def run_client(url: str, kind: str) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        url,
        kind,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO,
    )
    async with asyncio.timeout(600):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()[-3000:]
    result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- watchers


@dataclass
class Watch:
    """The worst gaps seen between answers while a hostile frame was in flight."""

    health_gap: float = 0.0
    progress_gap: float = 0.0
    health_answers: int = 0
    progress_messages: int = 0
    errors: list[str] = field(default_factory=list)


async def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    status = int(data.split(b" ", 2)[1])
    return status, data.partition(b"\r\n\r\n")[2]


async def poll_health(server: Any, watch: Watch, stop: asyncio.Event) -> None:
    host, port = urlsplit(server.http_url).hostname or "127.0.0.1", server.port
    last = time.monotonic()
    while not stop.is_set():
        status, _ = await http_get(host, port, "/health")
        if status != 200:
            watch.errors.append(f"/health answered {status}")
        now = time.monotonic()
        watch.health_gap = max(watch.health_gap, now - last)
        watch.health_answers += 1
        last = now
        await asyncio.sleep(0.005)


async def follow_progress(server: Any, watch: Watch, stop: asyncio.Event) -> None:
    """Another session runs jobs back to back; the gap between its progress messages."""
    from tests.support import open_client

    client = await open_client(server.ws_url)
    try:
        last: float | None = None
        job = 0
        while not stop.is_set():
            job += 1
            await client.submit(f"v{job}", steps=150)
            while True:
                message = await client.recv()
                now = time.monotonic()
                if message.type == "progress":
                    if last is not None:
                        watch.progress_gap = max(watch.progress_gap, now - last)
                    last = now
                    watch.progress_messages += 1
                if message.type in ("complete", "cancelled") or (
                    message.type == "error" and message.id == f"v{job}"
                ):
                    break
    finally:
        await client.close()


def _rss_peak_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _rss(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field_name)


async def watch_while(server: Any, kind: str) -> tuple[dict[str, Any], Watch, int | None]:
    """Send ``kind`` from another process while watching /health and a job's progress."""
    watch = Watch()
    stop = asyncio.Event()
    can_measure_rss = _rss_peak_reset()
    rss_before = _rss("VmRSS") if can_measure_rss else 0
    watchers = [
        asyncio.create_task(poll_health(server, watch, stop)),
        asyncio.create_task(follow_progress(server, watch, stop)),
    ]
    try:
        await asyncio.sleep(0.3)  # the victim's job is running, /health answering
        result = await run_client(server.ws_url, kind)
    finally:
        stop.set()
        await asyncio.gather(*watchers, return_exceptions=True)
    rss_growth = _rss("VmHWM") - rss_before if can_measure_rss else None
    for task in watchers:
        if task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return result, watch, rss_growth


# --------------------------------------------------------------------------- tests


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(HOSTILE))
async def test_hostile_frame_is_answered_without_stalling_others(start_server, kind) -> None:
    _, code, error_field = HOSTILE[kind]
    async with start_server() as server:
        result, watch, rss_growth = await watch_while(server, kind)
        print(
            f"{kind}: {result['bytes']} bytes -> {result['code']} in {result['seconds']:.2f} s; "
            f"worst gap /health {watch.health_gap * 1000:.0f} ms "
            f"({watch.health_answers} answers), progress {watch.progress_gap * 1000:.0f} ms "
            f"({watch.progress_messages} messages); peak RSS growth "
            f"{'n/a' if rss_growth is None else f'{rss_growth / MiB:.0f} MiB'}"
        )
        assert not watch.errors
        assert (result["code"], result["field"]) == (code, error_field), result
        assert watch.health_answers >= 2 and watch.progress_messages >= 2
        assert watch.health_gap < MAX_GAP_S
        assert watch.progress_gap < MAX_GAP_S
        if rss_growth is not None:
            assert rss_growth <= RSS_FACTOR * result["bytes"] + RSS_SLACK
        # The hostile session is still usable afterwards, and so is the server.
        status, body = await http_get("127.0.0.1", server.port, "/health")
        assert status == 200 and json.loads(body) == {"status": "ok"}


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise LookupError(name)


async def test_rejected_submits_are_counted_also_when_the_decoder_rejects_them(
    start_server,
) -> None:
    """``jobs_total{outcome="rejected"}`` counts every submit answered with an error."""
    from tests.support import open_client

    rejected = 'latentcast_jobs_total{outcome="rejected"}'
    async with start_server() as server:
        client = await open_client(server.ws_url)
        await client.send(submit({"prompt": "x", "steps": "many"}))  # invalid_request
        await client.send(submit({"prompt": "x", "loras": [{"name": "n"}] * 17}))
        await client.send({"type": "submit", "id": "a", "params": {"prompt": "x"}, "x": 1})
        await client.send({"type": "cancel", "id": "not a valid id"})  # not a submit
        await client.send({"type": "submitt", "id": "a"})  # unknown_type
        await client.send(b"\xc1")  # bad_frame
        await client.send({"type": "submit", "id": "dup", "params": {"prompt": "x"}, 1: 2})
        answers = [await client.recv() for _ in range(7)]
        assert [(a.code, a.field) for a in answers] == [
            ("invalid_request", "params.steps"),
            ("invalid_request", "params.loras"),
            ("invalid_request", "x"),
            ("invalid_request", "id"),
            ("unknown_type", None),
            ("bad_frame", None),
            ("bad_frame", None),
        ]
        status, body = await http_get("127.0.0.1", server.port, "/metrics")
        assert status == 200
        assert _metric(body.decode(), rejected) == 3.0
        await client.close()


async def _raw_websocket(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /v1/ws HTTP/1.1\r\n"
            f"Host: {host}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head
    return reader, writer


def _client_frame(opcode: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + masked


async def _read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(length)


async def test_text_frame_with_invalid_utf8_is_closed_with_1007(start_server) -> None:
    """RFC 6455: invalid UTF-8 in a text frame fails the connection with 1007."""
    async with start_server() as server:
        reader, writer = await _raw_websocket("127.0.0.1", server.port)
        try:
            async with asyncio.timeout(30):
                opcode, _ = await _read_server_frame(reader)  # welcome
                assert opcode == 0x2
                # A valid text frame is only a bad_frame; the connection stays open.
                writer.write(_client_frame(0x1, b'{"type": "cancel"}'))
                opcode, payload = await _read_server_frame(reader)
                assert opcode == 0x2
                assert msgpack.unpackb(payload)["code"] == "bad_frame"
                writer.write(_client_frame(0x1, b"caf\xc3(\xff"))
                opcode, payload = await _read_server_frame(reader)
                assert opcode == 0x8, (opcode, payload)
                assert struct.unpack("!H", payload[:2])[0] == 1007
        finally:
            writer.close()


async def test_keepalive_pings_every_20_s_and_waits_20_s(start_server) -> None:
    """Section 1: pings every 20 s; no answer within 20 s closes with 1011.

    websockets does the pinging and closes with 1011 on a ping timeout; what the server
    must get right is the two settings, checked here on a live server-side connection
    (waiting out a real timeout would take 40 s).
    """
    from tests.support import open_client

    async with start_server() as server:
        client = await open_client(server.ws_url)
        try:
            (session,) = server.sessions
            assert session.connection.ping_interval == 20
            assert session.connection.ping_timeout == 20
        finally:
            await client.close()


if __name__ == "__main__":
    _client_main(sys.argv[1], sys.argv[2])
