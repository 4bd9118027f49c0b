"""latentcast Python client: asyncio sessions with a latentcast server, and a sync helper.

::

    from latentcast.client import connect

    async with connect("ws://127.0.0.1:8765/v1/ws", token=None) as client:
        job = await client.submit("a lighthouse at dusk", steps=20, preview="latent")
        async for event in job:          # accepted, queued*, started, progress/preview*, end
            print(event.type)
        result = await job.result()      # raises JobCancelled / JobFailed / ConnectionLost
        result.images[0].save("out.png")

    # or, from a script:
    from latentcast.client import generate
    result = generate("ws://127.0.0.1:8765/v1/ws", "a lighthouse at dusk", steps=20)

Events are the typed messages of :mod:`latentcast.protocol`.
"""

from .connection import DEFAULT_URL, Client, Connecting, ControlSpec, LoraSpec, connect
from .errors import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionLost,
    JobCancelled,
    JobFailed,
    LatentcastError,
    RequestRejected,
    ServerUnavailable,
)
from .images import GeneratedImage, ImageInput, latent_to_pil, preview_to_pil
from .job import Job, JobEvent, JobStatus, Result, TerminalEvent
from .sync import generate

__all__ = [
    "DEFAULT_URL",
    "AuthenticationFailed",
    "Client",
    "ConnectFailed",
    "Connecting",
    "ConnectionLost",
    "ControlSpec",
    "GeneratedImage",
    "ImageInput",
    "Job",
    "JobCancelled",
    "JobEvent",
    "JobFailed",
    "JobStatus",
    "LatentcastError",
    "LoraSpec",
    "RequestRejected",
    "Result",
    "ServerUnavailable",
    "TerminalEvent",
    "connect",
    "generate",
    "latent_to_pil",
    "preview_to_pil",
]
