"""``latentcast generate``: argument handling, file names and error lines (no server)."""

from __future__ import annotations

import argparse

import pytest

from latentcast.client import (
    AuthenticationFailed,
    ConnectionLost,
    GeneratedImage,
    JobFailed,
    RequestRejected,
)
from latentcast.client.cli import (
    _settings,
    describe_error,
    normalize_url,
    output_paths,
)
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


@pytest.mark.parametrize(
    "argv",
    [
        ["-o", "x.bmp"],
        ["-o", "{nope}.png"],
        ["-o", "/no/such/folder/x.png"],
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
    [["--steps", "x"], ["--lora", "=1"], ["--lora", "a=b"], ["--init-image", "/no/such.png"]],
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
    assert "--token" in describe_error(AuthenticationFailed("401", url="ws://x", status=401))
    assert "shutdown" in describe_error(JobFailed("a", "shutdown", "stopping"))
    assert "1001" in describe_error(ConnectionLost("closed (1001)", code=1001))
