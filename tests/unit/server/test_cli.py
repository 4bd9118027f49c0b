"""Unit tests for latentcast.server.cli and latentcast.server.config (PROTOCOL.md section 9)."""

from __future__ import annotations

import errno
import socket
import subprocess
import sys
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

from latentcast.protocol import Limits
from latentcast.server import __version__, cli
from latentcast.server.cli import (
    BUILTIN_MODELS,
    SERVE_OPTIONS,
    build_parser,
    config_from,
    describe_listen_error,
    listen_problem,
    main,
)
from latentcast.server.config import ServerConfig

# Section 9 of PROTOCOL.md: every option a conforming server has.
PROTOCOL_OPTIONS = (
    "--host",
    "--port",
    "--model",
    "--device",
    "--token",
    "--allow-origin",
    "--max-queue",
    "--max-connections",
    "--drain-timeout",
    "--send-timeout",
    "--controlnet",
    "--resume-window",
)


def configure(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> ServerConfig:
    args = build_parser().parse_args(["serve", *argv])
    return config_from(args, environ or {})


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No LATENTCAST_* variable from the machine running the tests leaks in."""
    import os

    for name in list(os.environ):
        if name.startswith("LATENTCAST_"):
            monkeypatch.delenv(name)
    return monkeypatch


def run_main_error(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    assert info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "error" in captured.err
    return captured.err


# --------------------------------------------------------------------------- defaults


def test_defaults_match_the_protocol() -> None:
    config = configure()
    assert config == ServerConfig()
    assert config.host == "127.0.0.1"
    assert config.port == 8765
    assert config.model == ("tiny",)
    assert config.device == "auto"
    assert config.max_queue == 64
    assert config.max_connections == 1000
    assert config.drain_timeout == 30.0
    assert config.send_timeout == 30.0
    assert config.tokens == ()
    assert config.allow_origins == ()


def test_default_limits_match_the_protocol_defaults() -> None:
    # All but max_message_bytes: the server's default (32 MiB) is below the protocol model's
    # (64 MiB) so that receiving the largest frame stalls no other session past 100 ms.
    assert ServerConfig().limits() == Limits(max_message_bytes=32 * 2**20)
    assert ServerConfig().limits().max_bad_frames == 16


def test_default_max_message_bytes_holds_the_largest_result() -> None:
    config = ServerConfig()
    assert config.max_message_bytes == 32 * 2**20
    assert config.largest_result_bytes() <= config.max_message_bytes


# --------------------------------------------------------------------------- environment


def test_environment_is_read() -> None:
    config = configure(
        environ={
            "LATENTCAST_HOST": "0.0.0.0",
            "LATENTCAST_PORT": "9000",
            "LATENTCAST_MODEL": "/models/sd15",
            "LATENTCAST_DEVICE": "cpu",
            "LATENTCAST_MAX_QUEUE": "5",
            "LATENTCAST_MAX_CONNECTIONS": "7",
            "LATENTCAST_DRAIN_TIMEOUT": "2.5",
            "LATENTCAST_SEND_TIMEOUT": "0.5",
            "LATENTCAST_MAX_STEPS": "12",
            "LATENTCAST_LOG_LEVEL": "debug",
        }
    )
    assert config.host == "0.0.0.0"
    assert config.port == 9000
    assert config.model == ("/models/sd15",)
    assert config.device == "cpu"
    assert config.max_queue == 5
    assert config.max_connections == 7
    assert config.drain_timeout == 2.5
    assert config.send_timeout == 0.5
    assert config.max_steps == 12
    assert config.log_level == "debug"


def test_repeatable_options_are_comma_separated_in_the_environment() -> None:
    config = configure(
        environ={
            "LATENTCAST_TOKEN": "a,b",
            "LATENTCAST_ALLOW_ORIGIN": "https://app.example, http://localhost:3000",
        }
    )
    assert config.tokens == ("a", "b")
    assert config.allow_origins == ("https://app.example", "http://localhost:3000")


def test_empty_parts_of_a_repeatable_variable_are_ignored() -> None:
    assert configure(environ={"LATENTCAST_TOKEN": ""}).tokens == ()
    assert configure(environ={"LATENTCAST_TOKEN": "a,,b,"}).tokens == ("a", "b")


def test_unrelated_variables_are_ignored() -> None:
    config = configure(environ={"LATENTCAST_NOPE": "1", "PORT": "1", "latentcast_port": "2"})
    assert config == ServerConfig()


# --------------------------------------------------------------------------- command line


def test_command_line_options() -> None:
    config = configure(
        [
            "--host",
            "::1",
            "--port",
            "0",
            "--model",
            "runwayml/stable-diffusion-v1-5",
            "--device",
            "cuda:1",
            "--token",
            "t1",
            "--token",
            "t2",
            "--allow-origin",
            "https://a.example",
            "--allow-origin",
            "http://b.example:8080",
            "--max-queue",
            "3",
            "--max-connections",
            "2",
            "--drain-timeout",
            "0",
            "--send-timeout",
            "1.5",
        ]
    )
    assert config.host == "::1"
    assert config.port == 0
    assert config.model == ("runwayml/stable-diffusion-v1-5",)
    assert config.device == "cuda:1"
    assert config.tokens == ("t1", "t2")
    assert config.allow_origins == ("https://a.example", "http://b.example:8080")
    assert (config.max_queue, config.max_connections) == (3, 2)
    assert (config.drain_timeout, config.send_timeout) == (0.0, 1.5)


def test_command_line_wins_over_the_environment() -> None:
    environ = {
        "LATENTCAST_PORT": "9000",
        "LATENTCAST_HOST": "0.0.0.0",
        "LATENTCAST_TOKEN": "a,b",
        "LATENTCAST_SEND_TIMEOUT": "5",
    }
    config = configure(["--port", "9001", "--token", "c"], environ)
    assert config.port == 9001
    assert config.tokens == ("c",)
    # What the command line leaves out still comes from the environment.
    assert config.host == "0.0.0.0"
    assert config.send_timeout == 5.0


def test_main_reads_the_process_environment(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    clean_env.setenv("LATENTCAST_PORT", "70000")
    err = run_main_error(["serve"], capsys)
    assert "--port" in err
    # ...and the command line wins there too (then the bad value goes unread).
    clean_env.setenv("LATENTCAST_MAX_QUEUE", "0")
    err = run_main_error(["serve", "--port", "1"], capsys)
    assert "--max-queue" in err
    assert "--port" not in err.splitlines()[-1]


# --------------------------------------------------------------------------- invalid values


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        (["--port", "70000"], "--port"),
        (["--port=-1"], "--port"),
        (["--port", "eighty"], "--port"),
        (["--drain-timeout=-1"], "--drain-timeout"),
        (["--send-timeout=-1"], "--send-timeout"),
        (["--send-timeout", "0"], "--send-timeout"),
        (["--resume-window", "0"], "--resume-window"),
        (["--drain-timeout", "soon"], "--drain-timeout"),
        (["--allow-origin", "example.com"], "--allow-origin"),
        (["--allow-origin", "https://ok.example", "--allow-origin", "bad"], "--allow-origin"),
        (["--allow-origin", "https://example.com/"], "--allow-origin"),
        (["--max-queue", "0"], "--max-queue"),
        (["--max-connections", "0"], "--max-connections"),
        (["--max-queue", "1.5"], "--max-queue"),
        (["--token", ""], "--token"),
        (["--dtype", "float8"], "--dtype"),
        (["--log-level", "loud"], "--log-level"),
        (["--max-width", "32"], "--max-width"),
    ],
)
def test_invalid_values_exit_with_an_error_naming_the_option(
    argv: list[str],
    option: str,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = run_main_error(["serve", *argv], capsys)
    assert option in err


@pytest.mark.parametrize(
    ("name", "value", "option"),
    [
        ("LATENTCAST_PORT", "70000", "--port"),
        ("LATENTCAST_PORT", "http", "--port"),
        ("LATENTCAST_DRAIN_TIMEOUT", "-1", "--drain-timeout"),
        ("LATENTCAST_SEND_TIMEOUT", "-0.5", "--send-timeout"),
        ("LATENTCAST_ALLOW_ORIGIN", "https://ok.example,nope", "--allow-origin"),
        ("LATENTCAST_DTYPE", "float8", "--dtype"),
    ],
)
def test_invalid_environment_values_exit_naming_the_option(
    name: str,
    value: str,
    option: str,
    clean_env: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    clean_env.setenv(name, value)
    assert option in run_main_error(["serve"], capsys)


def test_config_from_raises_validation_errors() -> None:
    with pytest.raises(ValidationError):
        configure(["--port", "70000"])
    with pytest.raises(ValidationError):
        configure(environ={"LATENTCAST_SEND_TIMEOUT": "-1"})
    with pytest.raises(ValidationError):
        configure(environ={"LATENTCAST_ALLOW_ORIGIN": "example.com"})


def test_a_command_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    run_main_error([], capsys)
    run_main_error(["serv"], capsys)
    err = run_main_error(["serve", "--bogus"], capsys)
    assert "--bogus" in err


@pytest.mark.parametrize(
    ("argv", "command", "suggestion"),
    [
        (["serve", "--prot", "9000"], "serve", "--port"),
        (["serve", "--max-queeu=3"], "serve", "--max-queue"),
        (["generate", "a fox", "--stepz", "5"], "generate", "--steps"),
        (["generate", "--sed", "1", "a fox"], "generate", "--seed"),
    ],
)
def test_an_unknown_option_gets_the_subcommand_usage_and_a_suggestion(
    argv: list[str], command: str, suggestion: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = run_main_error(argv, capsys)
    assert err.startswith(f"usage: latentcast {command} ")
    assert f"latentcast {command}: error: unrecognized arguments: " in err
    assert f"did you mean {suggestion} " in err
    assert "usage: latentcast [-h]" not in err


def test_an_unknown_option_without_a_close_match(capsys: pytest.CaptureFixture[str]) -> None:
    err = run_main_error(["serve", "--zzzzzz"], capsys)
    assert err.startswith("usage: latentcast serve ")
    assert "unrecognized arguments: --zzzzzz" in err and "did you mean" not in err


def test_invalid_configuration_shows_the_serve_usage(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    err = run_main_error(["serve", "--port", "70000"], capsys)
    assert err.startswith("usage: latentcast serve ")
    assert "latentcast serve: error: invalid configuration: --port" in err


# --------------------------------------------------------------------------- listening


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something listens on (127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_listen_problem_names_a_port_in_use(busy_port: int) -> None:
    problem = listen_problem("127.0.0.1", busy_port)
    assert problem is not None
    assert f"port {busy_port} on 127.0.0.1 is already in use" in problem
    assert "--port N" in problem and "--port 0" in problem
    # Any address that covers it is refused too, as the real bind would be.
    assert listen_problem("0.0.0.0", busy_port) is not None


def test_listen_problem_passes_a_free_port_and_port_0() -> None:
    assert listen_problem("127.0.0.1", 0) is None
    assert listen_problem("127.0.0.1", _free_port()) is None


def test_listen_problem_names_a_bad_host() -> None:
    problem = listen_problem("no-such-host.invalid", 8765)
    assert problem is not None and "--host" in problem
    problem = listen_problem("192.0.2.1", 8765)  # TEST-NET-1: on no machine
    assert problem is not None and "not an address of this machine" in problem


def test_describe_listen_error() -> None:
    in_use = OSError(errno.EADDRINUSE, "error while attempting to bind: address in use")
    assert "port 9000 on ::1 is already in use" in str(describe_listen_error("::1", 9000, in_use))
    assert "--port" in str(describe_listen_error("h", 80, OSError(errno.EACCES, "denied")))
    assert describe_listen_error("h", 80, OSError(errno.ENOSPC, "full")) is None


def test_a_port_taken_after_the_check_is_reported_the_same_way(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A race: the port was free at the check, taken at the real bind."""

    def run_and_exit(config: ServerConfig) -> int:
        raise OSError(errno.EADDRINUSE, "error while attempting to bind on address")

    clean_env.setattr(cli, "_quiet_libraries", lambda: None)
    fake_app = types.SimpleNamespace(run_and_exit=run_and_exit)
    clean_env.setitem(sys.modules, "latentcast.server.app", fake_app)
    with pytest.raises(SystemExit) as info:
        main(["serve", "--port", str(_free_port())])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is already in use" in err and "--port 0" in err


def test_ctrl_c_before_the_command_runs_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert main(["generate", "x"]) == 130
    assert capsys.readouterr().err == "latentcast: interrupted\n"


# --------------------------------------------------------------------------- help, version


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "serve" in out
    assert "--version" in out


def test_serve_help_mentions_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in PROTOCOL_OPTIONS:
        assert option in out
        env = "LATENTCAST_" + option.removeprefix("--").replace("-", "_").upper()
        assert env in " ".join(out.split())
    for option in SERVE_OPTIONS:
        assert option.flag in out
    assert "/v1/ws" in out


def test_serve_help_lists_the_builtin_models_and_readable_metavars(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "tiny, tiny-sdxl, tiny-inpaint" in out
    for usage in (
        "--host HOST",
        "--port PORT",
        "--model [NAME=]SPEC",
        "--max-resident-models N",
        "--model-config DIR",
        "--lora NAME=PATH",
        "--controlnet NAME=PATH",
        "--token TOKEN",
        "--allow-origin ORIGIN",
        "--preview-decoder DIR",
        "--cache-dir DIR",
        "--drain-timeout SECONDS",
        "--max-queue N",
        "--max-width PX",
    ):
        assert usage in out
    assert "CHECKPOINT_CONFIG" not in out and "--max-queue MAX_QUEUE" not in out


def test_builtin_models_are_the_models_module_names() -> None:
    from latentcast.server.models import TINY_MODEL_NAMES

    assert BUILTIN_MODELS == TINY_MODEL_NAMES


def test_generate_help_gives_the_default_size(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "64x64 on the built-in tiny models" in out
    assert "--wait-ready SECONDS" in out


def test_every_protocol_option_exists() -> None:
    flags = {option.flag for option in SERVE_OPTIONS}
    assert set(PROTOCOL_OPTIONS) <= flags
    repeatable = {option.flag for option in SERVE_OPTIONS if option.repeatable}
    assert repeatable == {"--token", "--allow-origin", "--lora", "--controlnet", "--model"}


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"latentcast {__version__}"


def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "latentcast"
    if not script.exists():
        pytest.skip("the latentcast console script is not installed next to this Python")
    top = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert top.returncode == 0, top.stderr
    assert "serve" in top.stdout
    serve = subprocess.run(
        [str(script), "serve", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert serve.returncode == 0, serve.stderr
    for option in PROTOCOL_OPTIONS:
        assert option in serve.stdout


# --------------------------------------------------------------------------- ServerConfig


def test_server_config_is_frozen() -> None:
    config = ServerConfig()
    with pytest.raises(ValidationError):
        config.port = 1  # type: ignore[misc]
    with pytest.raises(ValidationError):
        config.tokens = ("a",)  # type: ignore[misc]
    assert config.port == 8765


def test_server_config_rejects_unknown_options() -> None:
    with pytest.raises(ValidationError):
        ServerConfig(prot=1)  # type: ignore[call-arg]


def test_server_config_validation() -> None:
    assert ServerConfig(port=0).port == 0
    assert ServerConfig(port=65535).port == 65535
    for bad in (
        {"port": 65536},
        {"port": -1},
        {"drain_timeout": -0.1},
        {"send_timeout": 0},
        {"allow_origins": ("example.com",)},
        {"allow_origins": ("https://example.com/",)},
        {"tokens": ("",)},
        {"max_queue": 0},
    ):
        with pytest.raises(ValidationError):
            ServerConfig(**bad)  # type: ignore[arg-type]
    assert ServerConfig(drain_timeout=0).drain_timeout == 0.0
    assert ServerConfig(allow_origins=("http://localhost:8080",)).allow_origins == (
        "http://localhost:8080",
    )


def test_limits_maps_fields() -> None:
    config = ServerConfig(
        max_width=2048,
        max_height=1536,
        max_steps=99,
        max_images=3,
        max_prompt_chars=77,
        max_jobs_per_session=5,
        max_message_bytes=2**21,
        max_bad_frames=4,
    )
    assert config.limits() == Limits(
        max_width=2048,
        max_height=1536,
        max_steps=99,
        max_images=3,
        max_prompt_chars=77,
        max_jobs_per_session=5,
        max_message_bytes=2**21,
        max_bad_frames=4,
    )


def test_loras_parse_as_name_equals_path(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["serve", "--lora", f"style={tmp_path / 'a.safetensors'}", "--lora", "ink=b"]
    )
    config = config_from(args, {})
    assert config.lora_paths() == {"style": tmp_path / "a.safetensors", "ink": Path("b")}
    env = config_from(build_parser().parse_args(["serve"]), {"LATENTCAST_LORA": "a=x,b=y"})
    assert env.lora_paths() == {"a": Path("x"), "b": Path("y")}
    for bad in ("noequals", "=path", "dup=a,dup=b", "bad name=x"):
        with pytest.raises(ValidationError):
            config_from(build_parser().parse_args(["serve"]), {"LATENTCAST_LORA": bad})


def test_controlnets_parse_as_name_equals_path(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["serve", "--controlnet", f"scribble={tmp_path / 'cn'}", "--controlnet", "canny=c.ckpt"]
    )
    config = config_from(args, {})
    assert config.controlnet_paths() == {"scribble": tmp_path / "cn", "canny": Path("c.ckpt")}
    assert config.model_arguments()["controlnets"] == config.controlnet_paths()
    env = config_from(build_parser().parse_args(["serve"]), {"LATENTCAST_CONTROLNET": "a=x, b=y"})
    assert env.controlnet_paths() == {"a": Path("x"), "b": Path("y")}
    for bad in ("noequals", "=path", "dup=a,dup=b", "bad name=x"):
        with pytest.raises(ValidationError, match="ControlNet"):
            config_from(build_parser().parse_args(["serve"]), {"LATENTCAST_CONTROLNET": bad})


def test_limits_whose_result_does_not_fit_the_message_limit_are_one_line(capsys) -> None:
    err = run_main_error(["serve", "--max-width", "1536", "--max-height", "1536"], capsys)
    assert "--max-message-bytes" in err and "Traceback" not in err


def test_resume_window_from_the_command_line_and_the_environment(
    clean_env: pytest.MonkeyPatch,
) -> None:
    assert configure().resume_window == 30.0
    assert configure(["--resume-window", "2.5"]).resume_window == 2.5
    assert configure([], {"LATENTCAST_RESUME_WINDOW": "7"}).resume_window == 7.0


# --------------------------------------------------------------------------- several models


def test_one_bare_model_is_named_by_its_spec() -> None:
    from latentcast.server.config import ModelSpec

    config = configure(["--model", "/models/sd15"])
    assert config.models == (ModelSpec("/models/sd15", "/models/sd15"),)
    assert config.default_model.name == "/models/sd15"
    assert config.resident_models == 1
    assert ServerConfig(model="tiny").model == ("tiny",), "a single string is one model"


def test_model_is_repeatable_as_name_equals_spec_the_first_the_default() -> None:
    from latentcast.server.config import ModelSpec

    config = configure(["--model", "sd=tiny", "--model", "xl=tiny-sdxl", "--model", "org/x"])
    assert config.models == (
        ModelSpec("sd", "tiny"),
        ModelSpec("xl", "tiny-sdxl"),
        ModelSpec("org/x", "org/x"),
    )
    assert config.default_model == ModelSpec("sd", "tiny")
    assert config.resident_models == 3, "by default every model stays loaded"


def test_a_part_before_equals_that_is_no_name_leaves_the_spec_whole() -> None:
    from latentcast.server.config import ModelSpec

    assert ModelSpec.parse("/data/a=b/model") == ModelSpec("/data/a=b/model", "/data/a=b/model")
    assert ModelSpec.parse("xl=/data/a=b") == ModelSpec("xl", "/data/a=b")


def test_models_come_comma_separated_from_the_environment() -> None:
    config = configure(
        environ={"LATENTCAST_MODEL": "a=tiny, b=tiny-sdxl", "LATENTCAST_MAX_RESIDENT_MODELS": "1"}
    )
    assert [model.name for model in config.models] == ["a", "b"]
    assert config.max_resident_models == 1
    assert config.resident_models == 1


def test_max_resident_models_is_at_most_the_number_of_models() -> None:
    config = configure(["--model", "a=tiny", "--max-resident-models", "5"])
    assert config.resident_models == 1
    with pytest.raises(ValidationError):
        configure(["--max-resident-models", "0"])


def test_model_names_must_be_unique(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValidationError, match="given twice"):
        configure(["--model", "a=tiny", "--model", "a=tiny-sdxl"])
    with pytest.raises(ValidationError, match="given twice"):
        configure(["--model", "tiny", "--model", "tiny"])
    err = run_main_error(["serve", "--model", "a=tiny", "--model", "a=tiny-sdxl"], capsys)
    assert "--model" in err and "'a' is given twice" in err


def test_ray_engines_with_several_models_are_a_configuration_error(
    clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ValidationError, match="serve one model"):
        configure(["--model", "a=tiny", "--model", "b=tiny-sdxl", "--engines", "2"])
    with pytest.raises(ValidationError, match="serve one model"):
        configure(["--model", "a=tiny", "--model", "b=tiny-sdxl", "--ray-address", "auto"])
    assert configure(["--model", "a=tiny", "--engines", "2"]).ray_engines == 2
    err = run_main_error(
        ["serve", "--model", "a=tiny", "--model", "b=tiny-sdxl", "--engines", "2"], capsys
    )
    assert "serve one model" in err and "Traceback" not in err


def test_only_the_default_model_gets_loras_and_the_preview_decoder(tmp_path: Path) -> None:
    config = configure(["--model", "a=tiny", "--model", "b=tiny-sdxl", "--lora", f"ink={tmp_path}"])
    assert config.model_arguments("a")["loras"] == {"ink": tmp_path}
    assert config.model_arguments() == config.model_arguments("a")
    assert "loras" not in config.model_arguments("b")
