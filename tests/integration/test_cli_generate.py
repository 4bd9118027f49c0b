"""``latentcast generate`` as a real subprocess against a real server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

from PIL import Image

from latentcast.client import connect

TIMEOUT = 60.0
LONG = 150  # steps (the default max_steps)


async def _start_cli(*argv: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "latentcast.server.cli",
        "generate",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )


async def _cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await _start_cli(*argv, env=env)
    async with asyncio.timeout(TIMEOUT):
        stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


def _metric(server, name: str, **labels: str) -> float:
    value = server.metrics.registry.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


async def test_generate_writes_images_and_previews(start_server, tmp_path: Path) -> None:
    async with start_server() as server:
        out = tmp_path / "out.png"
        previews = tmp_path / "previews"
        code, stdout, stderr = await _cli(
            "a red fox",
            "-o",
            str(out),
            "--url",
            server.ws_url,
            "--steps",
            "4",
            "--seed",
            "5",
            "--num-images",
            "2",
            "--preview-dir",
            str(previews),
        )
        assert code == 0, stderr
        second = tmp_path / "out-1.png"
        assert stdout.split() == [str(out), str(second)]
        for path in (out, second):
            with Image.open(path) as image:
                assert (image.format, image.size) == ("PNG", (64, 64))
        saved = sorted(previews.iterdir())
        assert saved and all(path.suffix == ".png" for path in saved)
        with Image.open(saved[0]) as preview:
            assert preview.format == "PNG"

        # The format follows the suffix; the URL and token may come from the environment.
        jpeg = tmp_path / "fox.jpg"
        code, _, stderr = await _cli(
            "a fox", "-o", str(jpeg), "--steps", "1", "-q", env={"LATENTCAST_URL": server.ws_url}
        )
        assert code == 0, stderr
        assert stderr == ""
        with Image.open(jpeg) as image:
            assert image.format == "JPEG"


async def test_usage_and_connection_errors(start_server, tmp_path: Path) -> None:
    code, _, stderr = await _cli("x", "--steps", "many")
    assert code == 2 and "--steps" in stderr

    code, stdout, stderr = await _cli("x", "--url", "ws://127.0.0.1:9/v1/ws", "-o", "x.png")
    assert code == 1 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("latentcast: error: cannot connect")
    assert "Traceback" not in stderr

    async with start_server(tokens=("secret",)) as server:
        out = str(tmp_path / "x.png")
        code, _, stderr = await _cli("x", "--url", server.ws_url, "-o", out)
        assert code == 1 and "401" in stderr and stderr.count("\n") == 1
        code, _, stderr = await _cli(
            "x", "--url", server.ws_url, "-o", out, "--token", "secret", "--width", "100"
        )
        assert code == 1 and stderr.count("\n") == 1
        assert "invalid_request" in stderr and "--width" in stderr
        code, _, stderr = await _cli(
            "x",
            "-o",
            out,
            "--steps",
            "1",
            "-q",
            env={"LATENTCAST_URL": server.ws_url, "LATENTCAST_TOKEN": "secret"},
        )
        assert code == 0, stderr


async def test_ctrl_c_cancels_the_job_on_the_server_and_exits_130(
    start_server, tmp_path: Path
) -> None:
    async with start_server() as server:
        process = await _start_cli(
            "a long one",
            "--url",
            server.ws_url,
            "-o",
            str(tmp_path / "x.png"),
            "--steps",
            str(LONG),
        )
        async with asyncio.timeout(TIMEOUT):
            while _metric(server, "latentcast_jobs_running") < 1:
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # a few steps in
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(TIMEOUT):
            _, stderr_bytes = await process.communicate()
        stderr = stderr_bytes.decode()
        assert process.returncode == 130, stderr
        assert "Traceback" not in stderr and "cancelled at step" in stderr
        assert time.monotonic() - interrupted < 8  # well under the 5 s grace + startup
        assert _metric(server, "latentcast_jobs_total", outcome="cancelled") == 1
        assert _metric(server, "latentcast_jobs_running") == 0
        assert not (tmp_path / "x.png").exists()

        # The engine is free: another client's job runs at once.
        async with connect(server.ws_url) as client:
            job = await client.submit("next", steps=1)
            assert job.position == 0
            async with asyncio.timeout(10):
                await job.result()
