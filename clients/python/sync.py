"""A synchronous helper for scripts: one job, start to finish, in one call."""

from __future__ import annotations

import asyncio
from typing import Any

from .connection import DEFAULT_OPEN_TIMEOUT, connect
from .job import Result


def generate(
    url: str,
    prompt: str,
    *,
    token: str | None = None,
    open_timeout: float | None = DEFAULT_OPEN_TIMEOUT,
    **params: Any,
) -> Result:
    """Connect, submit one job, wait for its images, disconnect.

    ``params`` are those of :meth:`Client.submit` (``steps=``, ``seed=``, ...). Runs its
    own event loop, so call it from plain synchronous code (in async code, use
    :func:`connect`). Raises what ``connect``, ``submit`` and ``Job.result`` raise.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "latentcast.client.generate() runs its own event loop; in async code use "
            "`async with latentcast.client.connect(url) as client` instead"
        )

    async def run() -> Result:
        async with connect(url, token, open_timeout=open_timeout) as client:
            job = await client.submit(prompt, **params)
            return await job.result()

    return asyncio.run(run())
