"""Graceful shutdown (PROTOCOL.md section 7), in process and as a real SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from latentcast.protocol import Draining, Error
from tests.support import is_terminal, open_client

#: A job that outlasts any deadline these tests set, however fast the machine: 150 steps
#: at 256x256 on the tiny model take seconds even with every core (a step still ends
#: within a fraction of a second, so a stop takes effect quickly).
LONG_JOB = {"steps": 150, "width": 256, "height": 256}


def _ready_status(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


async def _closed_code(client) -> int:
    """Read until the server closes the connection; the close code."""
    with pytest.raises(ConnectionClosed):
        while True:
            await client.recv(timeout=30)
    return client.ws.close_code


async def test_drain_lets_jobs_finish_refuses_new_work_and_closes_with_1001(start_server) -> None:
    async with start_server(drain_timeout=60) as server:
        one = await open_client(server.ws_url)
        two = await open_client(server.ws_url)
        await one.submit("running", steps=20)
        await one.recv_until(lambda m: m.type == "started")
        await two.submit("queued", steps=2)
        await two.recv_until(lambda m: m.type == "accepted")

        drain = asyncio.create_task(server.drain())
        draining = await one.recv_until(lambda m: isinstance(m, Draining))
        assert 0 < draining[-1].deadline_ms <= 60_000
        status, body = await asyncio.to_thread(_ready_status, server.http_url)
        assert (status, body) == (503, {"ready": False, "reason": "draining"})
        with pytest.raises(InvalidStatus) as refused:
            await open_client(server.ws_url)
        assert refused.value.response.status_code == 503
        await two.submit("late", steps=1)
        refusal = await two.recv_until(lambda m: m.type == "error" and m.id == "late")
        assert refusal[-1].code == "draining"
        assert sum(isinstance(m, Draining) for m in refusal) == 1

        assert (await one.job_messages("running"))[-1].type == "complete"
        assert (await two.job_messages("queued"))[-1].type == "complete"
        assert await _closed_code(one) == 1001
        assert await _closed_code(two) == 1001
        assert sum(isinstance(m, Draining) for m in one.received) == 1
        await drain


async def test_at_the_deadline_unfinished_jobs_end_with_shutdown(start_server) -> None:
    async with start_server(drain_timeout=1.0) as server:
        client = await open_client(server.ws_url)
        await client.submit("running", **LONG_JOB)
        await client.recv_until(lambda m: m.type == "started")
        await client.submit("queued", **LONG_JOB)
        await client.recv_until(lambda m: m.type == "accepted" and m.id == "queued")
        drain = asyncio.create_task(server.drain())
        messages = await client.recv_until(lambda m: is_terminal(m, "running"))
        messages += await client.recv_until(lambda m: is_terminal(m, "queued"))
        ends = {m.id: (m.type, m.code) for m in messages if is_terminal(m)}
        assert ends == {"running": ("error", "shutdown"), "queued": ("error", "shutdown")}
        assert await _closed_code(client) == 1001
        await drain


async def test_a_second_stop_request_moves_the_deadline_to_now(start_server) -> None:
    async with start_server(drain_timeout=600) as server:
        client = await open_client(server.ws_url)
        await client.submit("running", **LONG_JOB)
        await client.recv_until(lambda m: m.type == "started")
        server.request_stop()
        drain = asyncio.create_task(server.drain())
        await client.recv_until(lambda m: isinstance(m, Draining))
        server.request_stop()
        end = (await client.job_messages("running", timeout=30))[-1]
        assert isinstance(end, Error) and end.code == "shutdown"
        await drain


@pytest.mark.parametrize("second_signal", [False, True])
async def test_sigterm_drains_a_real_server_process(model_cache: Path, second_signal: bool) -> None:
    """Every accepted job gets exactly one terminal message, close 1001, exit status 0."""
    env = dict(os.environ, LATENTCAST_CACHE_DIR=str(model_cache), PYTHONUNBUFFERED="1")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "latentcast.server.cli",
        "serve",
        "--port",
        "0",
        "--cache-dir",
        str(model_cache),
        "--drain-timeout",
        "120",
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert process.stderr is not None
        url = None
        async with asyncio.timeout(60):
            while url is None:
                line = (await process.stderr.readline()).decode()
                assert line, "the server exited before listening"
                match = re.search(r"listening on (ws://\S+)", line)
                url = match.group(1) if match else None
        http_url = url.replace("ws://", "http://").removesuffix("/v1/ws")
        async with asyncio.timeout(60):
            while (await asyncio.to_thread(_ready_status, http_url))[0] != 200:
                await asyncio.sleep(0.1)

        client = await open_client(url)
        if second_signal:
            await client.submit("running", **LONG_JOB)
        else:
            await client.submit("running", steps=12)
        await client.recv_until(lambda m: m.type == "started")
        for k in range(3):
            await client.submit(f"queued{k}", steps=2)
        await client.recv_until(lambda m: m.type == "accepted" and m.id == "queued2")

        process.send_signal(signal.SIGTERM)
        await client.recv_until(lambda m: isinstance(m, Draining))
        if second_signal:
            process.send_signal(signal.SIGTERM)
        jobs = {"running", "queued0", "queued1", "queued2"}
        with pytest.raises(ConnectionClosed):
            while True:
                await client.recv(timeout=60)
        assert client.ws.close_code == 1001
        ends = [m for m in client.received if is_terminal(m)]
        assert sorted(m.id for m in ends) == sorted(jobs), "exactly one terminal message per job"
        expected = "error" if second_signal else "complete"
        assert {m.type for m in ends} == {expected}
        if second_signal:
            assert {m.code for m in ends} == {"shutdown"}
        async with asyncio.timeout(30):
            assert await process.wait() == 0
        log = (await process.stderr.read()).decode()
        assert "drained" in log
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
