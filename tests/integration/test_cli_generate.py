"""``latentcast generate`` as a real subprocess against a real server."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from latentcast.client import connect
from latentcast.client.cli import CANCEL_GRACE
from latentcast.server.app import Server
from latentcast.server.config import ServerConfig
from latentcast.server.engine import EngineCore, JobStepped, StepReport
from latentcast.server.engine import models as engine_models

TIMEOUT = 60.0
LONG = 150  # steps (the default max_steps)


async def _start_cli(
    *argv: str, env: dict[str, str] | None = None, python_flags: tuple[str, ...] = ()
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *python_flags,
        "-m",
        "latentcast.server.cli",
        "generate",
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        # As from a terminal: a test run started in the background (CI, `make test &`)
        # inherits an ignored SIGINT, which Python would keep ignoring until the command's
        # own handler is installed.
        preexec_fn=_default_sigint,
    )


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


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
        out = tmp_path / "out" / "out.png"  # a folder that does not exist yet
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
        second = tmp_path / "out" / "out-1.png"
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
    assert stderr == (
        "latentcast: error: no latentcast server answers at ws://127.0.0.1:9/v1/ws "
        "(connection refused): start one with 'latentcast serve' (or 'make serve' in a source "
        "checkout), or pass --url (or set LATENTCAST_URL) with the address of a running one\n"
    )

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


async def test_an_unknown_option_suggests_the_right_one() -> None:
    code, stdout, stderr = await _cli("a fox", "--stepz", "5")
    assert code == 2 and stdout == ""
    assert stderr.startswith("usage: latentcast generate ")
    assert stderr.rstrip().endswith(
        "latentcast generate: error: unrecognized arguments: --stepz 5; "
        "did you mean --steps (not --stepz)?"
    )


async def test_a_wrong_path_names_the_websocket_path(start_server, tmp_path: Path) -> None:
    async with start_server() as server:
        url = f"ws://127.0.0.1:{server.port}/ws"
        code, _, stderr = await _cli("x", "--url", url, "-o", str(tmp_path / "x.png"))
    assert code == 1
    assert stderr == (
        f"latentcast: error: no latentcast endpoint at /ws on 127.0.0.1:{server.port} "
        f"(HTTP 404); the WebSocket path is /v1/ws: try ws://127.0.0.1:{server.port}/v1/ws\n"
    )


async def test_a_server_at_its_connection_limit_says_so(start_server, tmp_path: Path) -> None:
    async with start_server(max_connections=1) as server, connect(server.ws_url):
        code, _, stderr = await _cli("x", "--url", server.ws_url, "-o", str(tmp_path / "x.png"))
    assert code == 1 and stderr.count("\n") == 1
    assert "is at its connection limit (its --max-connections)" in stderr
    assert not (tmp_path / "x.png").exists()


async def test_a_loading_server_is_waited_for(
    model_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real_load = engine_models.load_model

    def slow_load(*args: Any, **kwargs: Any) -> Any:
        release.wait(TIMEOUT)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(engine_models, "load_model", slow_load)  # where the server loads
    out = tmp_path / "x.png"
    try:
        async with Server(ServerConfig(port=0, cache_dir=model_cache)) as server:
            url = server.ws_url
            code, _, stderr = await _cli("x", "--url", url, "-o", str(out), "--wait-ready", "0")
            assert code == 1
            assert stderr == (
                f"latentcast: error: the server at {url} is still loading its model: try "
                "again in a moment, or let --wait-ready SECONDS wait for it\n"
            )
            started = time.monotonic()
            code, _, stderr = await _cli("x", "--url", url, "-o", str(out), "--wait-ready", "1")
            assert code == 1 and time.monotonic() - started >= 1
            assert stderr.endswith(
                f"latentcast: error: the server at {url} is still loading its model after 1 s: "
                "wait longer with --wait-ready SECONDS, or look at the server's log\n"
            )

            process = await _start_cli("x", "--url", url, "-o", str(out), "--steps", "2")
            await asyncio.sleep(1.5)
            assert process.returncode is None  # still waiting
            release.set()
            async with asyncio.timeout(TIMEOUT):
                stdout, stderr_bytes = await process.communicate()
            stderr = stderr_bytes.decode()
            assert process.returncode == 0, stderr
            assert stdout.decode().split() == [str(out)]
            assert f"waiting for the server at {url} to load its model (up to 60 s)" in stderr
    finally:
        release.set()


async def _wait_for_line(stream: asyncio.StreamReader, text: str) -> list[str]:
    """Lines read from ``stream`` up to and including the first one containing ``text``."""
    lines: list[str] = []
    async with asyncio.timeout(TIMEOUT):
        while True:
            line = (await stream.readline()).decode()
            assert line, f"{text!r} never came; got {lines}"
            lines.append(line)
            if text in line:
                return lines


async def test_ctrl_c_while_starting_exits_130_quietly(tmp_path: Path) -> None:
    """A Ctrl-C while the imports run, or while connecting: 130, one line, no traceback."""
    connected = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connected.set()  # and never answer the handshake

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1/ws"
    argv = ("x", "--url", url, "-o", str(tmp_path / "x.png"))
    async with server:
        # -X importtime reports each import as it finishes: interrupt right after rich's,
        # which the command imports while it builds its parser.
        process = await _start_cli(*argv, python_flags=("-X", "importtime"))
        assert process.stderr is not None
        lines = await _wait_for_line(process.stderr, "rich.console")
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(TIMEOUT):
            _, rest = await process.communicate()
        lines += rest.decode().splitlines(keepends=True)
        said = [line for line in lines if not line.startswith("import time:")]
        assert process.returncode == 130, said
        assert said == ["latentcast: interrupted\n"]

        connected.clear()
        process = await _start_cli(*argv)
        async with asyncio.timeout(TIMEOUT):
            await connected.wait()
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(TIMEOUT):
            _, stderr = await process.communicate()
        assert process.returncode == 130
        assert stderr.decode() == "latentcast: interrupted; nothing was submitted\n"


async def test_ctrl_c_waits_for_the_end_of_a_slow_step(
    start_server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server stops a job at the end of a step: with steps slower than CANCEL_GRACE,
    Ctrl-C still waits for the cancelled (about one and a half steps)."""
    slow = CANCEL_GRACE + 0.6
    first_step = threading.Event()
    real_step = EngineCore.step

    def slow_step(self: Any, aborts: Any = ()) -> StepReport:
        report = real_step(self, aborts)
        if report.unet_rows:  # a denoising step ran: it took `slow` seconds
            time.sleep(slow)
        if any(isinstance(event, JobStepped) and event.step == 1 for event in report.events):
            first_step.set()
        return report

    monkeypatch.setattr(EngineCore, "step", slow_step)
    async with start_server() as server:
        process = await _start_cli(
            "slow", "--url", server.ws_url, "-o", str(tmp_path / "x.png"), "--steps", "4"
        )
        async with asyncio.timeout(TIMEOUT):
            while not first_step.is_set():
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # the client has read step 1; step 2 takes `slow` seconds
        interrupted = time.monotonic()
        process.send_signal(signal.SIGINT)
        async with asyncio.timeout(TIMEOUT):
            _, stderr_bytes = await process.communicate()
        stderr = stderr_bytes.decode()
        waited = time.monotonic() - interrupted
        assert process.returncode == 130, stderr
        assert "latentcast: interrupted; job job-1 cancelled at step 2\n" in stderr, stderr
        assert CANCEL_GRACE < waited < 2 * slow
        assert _metric(server, "latentcast_jobs_total", outcome="cancelled") == 1


async def test_generate_with_controls(start_server, tmp_path: Path) -> None:
    """--control NAME=IMAGE[:SCALE] reads the file and steers the job as the Python
    client's controls= does; an unknown name is one error line naming the option."""
    from tests.fixtures.controlnets import build_tiny_controlnet
    from tests.integration.test_controls import scribble

    folder = build_tiny_controlnet(tmp_path / "controlnet")
    sketch = tmp_path / "sketch.png"
    scribble().save(sketch)
    async with start_server(controlnets=(f"scribble={folder}",)) as server:
        common = ("--url", server.ws_url, "--steps", "3", "--seed", "4", "-q")
        plain, steered = tmp_path / "plain.png", tmp_path / "steered.png"
        code, _, stderr = await _cli("a fox", "-o", str(plain), *common)
        assert code == 0, stderr
        code, _, stderr = await _cli(
            "a fox", "-o", str(steered), *common, "--control", f"scribble={sketch}:0.8"
        )
        assert code == 0, stderr
        assert plain.read_bytes() != steered.read_bytes()

        async with connect(server.ws_url) as client:
            job = await client.submit(
                "a fox", steps=3, seed=4, controls=[("scribble", sketch, 0.8)]
            )
            result = await job.result()
        assert result.images[0].data == steered.read_bytes()

        code, stdout, stderr = await _cli(
            "a fox", "-o", str(tmp_path / "x.png"), *common, "--control", f"depth={sketch}"
        )
        assert code == 1 and stdout == "" and stderr.count("\n") == 1
        assert "params.controls.0.name" in stderr and "--control" in stderr


async def test_generate_on_a_named_model(start_server, tmp_path: Path) -> None:
    async with start_server(model=("sd=tiny", "xl=tiny-sdxl")) as server:
        outs = {}
        for name in ("sd", "xl"):
            outs[name] = tmp_path / f"{name}.png"
            previews = tmp_path / f"previews-{name}"
            code, _, stderr = await _cli(
                "a fox",
                "-o",
                str(outs[name]),
                "--url",
                server.ws_url,
                "--model",
                name,
                "--steps",
                "2",
                "--seed",
                "1",
                "--preview-dir",
                str(previews),
                "-q",
            )
            assert code == 0, stderr
            assert any(previews.iterdir())
        assert outs["sd"].read_bytes() != outs["xl"].read_bytes()
        code, _, stderr = await _cli(
            "a fox", "-o", str(tmp_path / "x.png"), "--url", server.ws_url, "--model", "nope"
        )
        assert code == 1 and "--model" in stderr and "nope" in stderr
