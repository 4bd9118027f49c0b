"""``latentcast serve`` as a real subprocess: start-up errors are one line saying what to do."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

TIMEOUT = 120.0


def _serve(*argv: str, cache: Path, python_flags: tuple[str, ...] = ()) -> tuple[int, str]:
    """Run ``latentcast serve ARGV`` to its end: (exit status, stderr)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LATENTCAST_")},
        "LATENTCAST_CACHE_DIR": str(cache),
        "HF_HUB_OFFLINE": "1",
    }
    done = subprocess.run(
        [sys.executable, *python_flags, "-m", "latentcast.server.cli", "serve", *argv],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        check=False,
    )
    assert done.stdout == ""
    return done.returncode, done.stderr


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_port_in_use_is_named_before_anything_slow_starts(busy_port: int, tmp_path: Path) -> None:
    started = time.monotonic()
    code, stderr = _serve(
        "--port", str(busy_port), cache=tmp_path, python_flags=("-X", "importtime")
    )
    elapsed = time.monotonic() - started
    imports = [line for line in stderr.splitlines() if line.startswith("import time:")]
    said = [line for line in stderr.splitlines() if not line.startswith("import time:")]
    assert code == 1
    assert said == [
        f"latentcast: error: port {busy_port} on 127.0.0.1 is already in use (another "
        "latentcast serve?): choose another with --port N, or --port 0 for a free one"
    ]
    # Found out before torch (seconds) is even imported.
    assert not any(line.rstrip().endswith("| torch") for line in imports)
    assert elapsed < 30


@pytest.mark.parametrize(
    ("name", "content", "cause"),
    [
        (None, None, "no such file or folder"),
        ("model.safetensors", b"<html><body>Not Found</body></html>\n", "not a valid checkpoint"),
    ],
    ids=["wrong-path", "corrupt-checkpoint"],
)
def test_a_model_that_cannot_load_is_one_error_and_status_1(
    name: str | None, content: bytes | None, cause: str, tmp_path: Path
) -> None:
    if name is None:
        model = str(tmp_path / "nonexistent")
    else:
        path = tmp_path / name
        assert content is not None
        path.write_bytes(content)
        model = str(path)
    code, stderr = _serve("--model", model, "--port", "0", cache=tmp_path / "cache")
    assert code == 1, stderr
    assert "Traceback" not in stderr
    assert stderr.count(cause) == 1, stderr
    assert stderr.count("could not load model") == 1, stderr
    assert model in stderr
    # Nothing was served: nothing to drain.
    assert "draining" not in stderr and "drained" not in stderr, stderr


def test_engines_without_ray_say_which_extra_to_install(tmp_path: Path) -> None:
    """``--engines`` where Ray is not installed: one line naming the extra, status 1."""
    hide_ray = (
        "import sys; sys.modules['ray'] = None; "  # as if the ray extra were not installed
        "from latentcast.server.cli import main; sys.exit(main())"
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LATENTCAST_")},
        "LATENTCAST_CACHE_DIR": str(tmp_path / "cache"),
    }
    done = subprocess.run(
        [sys.executable, "-c", hide_ray, "serve", "--engines", "2", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.count("pip install 'latentcast[ray]'") == 1, done.stderr
