"""``latentcast generate``: argument handling, file names and error lines (no server)."""

from __future__ import annotations

import argparse

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from latentcast.client import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionLost,
    GeneratedImage,
    JobFailed,
    RequestRejected,
    ServerUnavailable,
)
from latentcast.client.cli import (
    CANCEL_GRACE,
    CANCEL_GRACE_MAX,
    WAIT_READY,
    _settings,
    cancel_grace,
    describe_error,
    normalize_url,
    output_paths,
)
from latentcast.client.connection import _connection_refused, _refused
from latentcast.server.cli import build_parser


def _parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["generate", *argv])


def _image(seed: int) -> GeneratedImage:
    return GeneratedImage(data=b"", format="png", width=64, height=64, seed=seed)


def test_settings_infer_the_format_and_read_the_environment(tmp_path) -> None:
    out = tmp_path / "fox.JPG"
    args = _parse("a fox", "-o", str(out), "--steps", "3", "--lora", "style=0.5", "--lora", "x")
    settings = _settings(args, {"LATENTCAST_URL": "ws://h:1", "LATENTCAST_TOKEN": "t"})
    assert settings.output_format == "jpeg"
    assert (settings.url, settings.token) == ("ws://h:1/v1/ws", "t")
    assert settings.params == {"steps": 3, "loras": [("style", 0.5), ("x", 1.0)]}
    explicit = _settings(
        _parse("a", "-o", str(out), "--output-format", "webp", "--url", "ws://a:2/v1/ws"),
        {"LATENTCAST_URL": "ws://h:1"},
    )
    assert (explicit.output_format, explicit.url) == ("webp", "ws://a:2/v1/ws")


def test_controls_read_their_image_files_with_an_optional_scale(tmp_path) -> None:
    scribble = tmp_path / "scribble.png"
    scribble.write_bytes(b"png bytes")
    odd = tmp_path / "a:b.png"  # a ':' in the file name is not a scale
    odd.write_bytes(b"other")
    args = _parse(
        "p",
        "--control",
        f"scribble={scribble}",
        "--control",
        f"edges={scribble}:0.5",
        "--control",
        f"x={odd}",
    )
    settings = _settings(args, {})
    assert settings.params == {
        "controls": [
            ("scribble", b"png bytes", 1.0),
            ("edges", b"png bytes", 0.5),
            ("x", b"other", 1.0),
        ]
    }


@pytest.mark.parametrize(
    "argv",
    [
        ["-o", "x.bmp"],
        ["-o", "{nope}.png"],
        ["-o", f"{__file__}/x.png"],  # a file where the folder should be
        ["--mask", __file__],
        ["--preview", "latent"],
    ],
)
def test_inconsistent_options_exit_2(argv: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        _settings(_parse("p", *argv), {})
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--steps", "x"],
        ["--lora", "=1"],
        ["--lora", "a=b"],
        ["--init-image", "/no/such.png"],
        ["--control", "scribble"],
        ["--control", "=x.png"],
        ["--control", "scribble=/no/such.png"],
        ["--control", "scribble=/no/such.png:0.5"],
    ],
)
def test_bad_values_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parse("p", *argv)
    assert exit_.value.code == 2


def test_output_paths() -> None:
    images = [_image(10), _image(11), _image(12)]
    assert [str(p) for p in output_paths("out/x.png", images)] == [
        "out/x.png",
        "out/x-1.png",
        "out/x-2.png",
    ]
    assert [str(p) for p in output_paths("s{seed}.png", images)] == [
        "s10.png",
        "s11.png",
        "s12.png",
    ]
    assert [str(p) for p in output_paths("i{index}.webp", images[:2])] == ["i0.webp", "i1.webp"]


def test_normalize_url() -> None:
    assert normalize_url("http://h:8765") == "ws://h:8765/v1/ws"
    assert normalize_url("https://h/") == "wss://h/v1/ws"
    assert normalize_url("ws://h:1/v1/ws?token=t") == "ws://h:1/v1/ws?token=t"


def test_error_lines_name_the_option() -> None:
    rejected = RequestRejected(
        "invalid_request", "params.width must be a multiple of 8", field="params.width"
    )
    line = describe_error(rejected)
    assert "invalid_request" in line and "--width" in line and "\n" not in line
    assert "--lora" in describe_error(
        RequestRejected("invalid_request", "unknown", field="params.loras.0.name")
    )
    assert "--control" in describe_error(
        RequestRejected("invalid_request", "unknown", field="params.controls.0.name")
    )
    assert "--token" in describe_error(AuthenticationFailed("401", url="ws://x", status=401))
    assert "shutdown" in describe_error(JobFailed("a", "shutdown", "stopping"))
    assert "1001" in describe_error(ConnectionLost("closed (1001)", code=1001))


def _http_refusal(url: str, status: int, body: bytes) -> ConnectFailed:
    response = Response(status, "", Headers(), body)
    return _refused(url, InvalidStatus(response))


def test_a_404_names_the_websocket_path() -> None:
    error = _http_refusal("ws://h:8765/ws?token=t", 404, b"not found\n")
    assert (error.status, error.reason) == (404, "not_found")
    assert "no latentcast endpoint at /ws on h:8765 (HTTP 404)" in error.message
    assert "the WebSocket path is /v1/ws: try ws://h:8765/v1/ws?token=t" in error.message
    # The right path and still 404: not a latentcast server.
    other = _http_refusal("ws://h:80/v1/ws", 404, b"")
    assert other.reason == "not_found" and "is it a latentcast server?" in other.message
    assert describe_error(error) == error.message


@pytest.mark.parametrize(
    ("body", "reason", "says"),
    [
        (b"unavailable: loading\n", "loading", "still loading its model"),
        (b"unavailable: draining\n", "draining", "shutting down (draining)"),
        (
            b"unavailable: the connection limit is reached\n",
            "connection_limit",
            "at its connection limit",
        ),
        (b"", None, "is unavailable (HTTP 503)"),
    ],
)
def test_a_503_says_why(body: bytes, reason: str | None, says: str) -> None:
    error = _http_refusal("ws://h:1/v1/ws", 503, body)
    assert isinstance(error, ServerUnavailable)
    assert error.reason == reason
    assert says in error.message
    line = describe_error(error)
    assert says in line and "\n" not in line
    if reason == "draining":
        assert "--url" in line
    if reason == "connection_limit":
        assert "--max-connections" in line


def test_nothing_listening_says_how_to_start_a_server() -> None:
    error = ConnectFailed("x", url="ws://127.0.0.1:9999/v1/ws", reason="refused")
    line = describe_error(error)
    assert line.startswith("no latentcast server answers at ws://127.0.0.1:9999/v1/ws")
    assert "'latentcast serve'" in line and "'make serve'" in line and "--url" in line


def test_connection_refused_is_recognised() -> None:
    assert _connection_refused(ConnectionRefusedError(111, "Connect call failed"))
    both = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('::1', 1, 0, 0), "
        "[Errno 111] Connect call failed ('127.0.0.1', 1)"
    )
    assert _connection_refused(both)
    mixed = OSError("Multiple exceptions: [Errno 111] a, [Errno 101] Network is unreachable")
    assert not _connection_refused(mixed)
    assert not _connection_refused(OSError(113, "No route to host"))


def test_wait_ready_option() -> None:
    assert _settings(_parse("p"), {}).wait_ready == WAIT_READY == 60
    assert _settings(_parse("p", "--wait-ready", "2.5"), {}).wait_ready == 2.5
    assert _settings(_parse("p", "--wait-ready", "0"), {}).wait_ready == 0
    for bad in ("-1", "soon", "inf", "nan"):
        with pytest.raises(SystemExit):
            _parse("p", "--wait-ready", bad)


def test_cancel_grace_covers_a_slow_step() -> None:
    assert cancel_grace(None) == CANCEL_GRACE  # still queued: cancelled at once
    assert cancel_grace(0.05) == CANCEL_GRACE
    assert cancel_grace(6.0) == 10.0  # one and a half steps, and a second
    assert cancel_grace(600.0) == CANCEL_GRACE_MAX
