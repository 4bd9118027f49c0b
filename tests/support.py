"""A bare test client over a real WebSocket, speaking through latentcast.protocol only.

Deliberately thin (no retries, no convenience beyond reading typed messages) so that the
integration tests see exactly what the server sends.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
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


@dataclass
class Client:
    ws: ClientConnection
    welcome: Welcome
    received: list[Any] = field(default_factory=list)
    #: (monotonic receive time, message), to order what two clients read concurrently.
    timeline: list[tuple[float, Any]] = field(default_factory=list)

    async def send(self, message: BaseModel | dict[str, Any] | bytes | str) -> None:
        if isinstance(message, BaseModel):
            await self.ws.send(encode_message(message))
        elif isinstance(message, dict):
            await self.ws.send(msgpack.packb(message, use_bin_type=True))
        else:
            await self.ws.send(message)

    async def submit(self, job_id: str, prompt: str = "a cat", **params: Any) -> None:
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
