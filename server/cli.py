"""``latentcast`` command line: ``latentcast serve [options]`` and ``latentcast generate``.

``generate`` is the Python client's (:mod:`latentcast.client.cli`); only ``serve`` lives here.

Every option can also come from the environment as ``LATENTCAST_<NAME>`` (for example
``LATENTCAST_PORT=9000``; repeatable options comma-separated); the command line wins.

This module imports only the standard library at the top: everything else (the client,
pydantic, torch) is imported inside :func:`main`, so a Ctrl-C while those imports run
ends quietly with status 130, and ``serve`` reports a port in use before torch loads.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from . import __version__

if TYPE_CHECKING:
    from .config import ServerConfig

ENV_PREFIX = "LATENTCAST_"
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

#: The built-in models (latentcast.server.models.TINY_MODEL_NAMES, which imports torch;
#: a unit test keeps the two equal).
BUILTIN_MODELS = ("tiny", "tiny-sdxl", "tiny-inpaint")


@dataclass(frozen=True)
class _Option:
    flag: str
    dest: str
    help: str
    type: Any = str
    repeatable: bool = False
    choices: Sequence[str] | None = None
    metavar: str | None = None


SERVE_OPTIONS = (
    _Option("--host", "host", "interface to listen on (default 127.0.0.1)", metavar="HOST"),
    _Option("--port", "port", "TCP port; 0 picks a free one (default 8765)", int, metavar="PORT"),
    _Option(
        "--model",
        "model",
        f"a built-in model: {', '.join(BUILTIN_MODELS)} (small, random weights, no "
        "download; SD 1.x, SDXL and SD 1.x inpainting), or a diffusers folder, a "
        ".safetensors/.ckpt checkpoint, or a Hugging Face Hub model id (default tiny); "
        "repeatable as NAME=SPEC to serve several models, jobs choosing one by NAME "
        "(the first is the default)",
        repeatable=True,
        metavar="[NAME=]SPEC",
    ),
    _Option(
        "--max-resident-models",
        "max_resident_models",
        "how many of the --model models stay loaded at once; the least recently used idle "
        "one is unloaded to make room (default: all of them)",
        int,
        metavar="N",
    ),
    _Option(
        "--device", "device", "auto, cpu, cuda, cuda:N or mps (default auto)", metavar="DEVICE"
    ),
    _Option(
        "--dtype",
        "dtype",
        "weights dtype (default: float16 on GPUs, float32 on CPU)",
        choices=("float16", "bfloat16", "float32"),
    ),
    _Option(
        "--cache-dir",
        "cache_dir",
        "where the built-in models are built (default ~/.cache/latentcast)",
        metavar="DIR",
    ),
    _Option(
        "--token",
        "tokens",
        "accept this bearer token (repeatable; none: no auth)",
        repeatable=True,
        metavar="TOKEN",
    ),
    _Option(
        "--allow-origin",
        "allow_origins",
        "allow browser pages from this origin, e.g. https://app.example (repeatable; none: any)",
        repeatable=True,
        metavar="ORIGIN",
    ),
    _Option(
        "--model-config",
        "checkpoint_config",
        "for a single-file checkpoint: a local diffusers folder (or tiny / tiny-sdxl) with "
        "its configs, so nothing is fetched from a hub",
        metavar="DIR",
    ),
    _Option(
        "--lora",
        "loras",
        "load a LoRA adapter at start; jobs select it by NAME (repeatable)",
        repeatable=True,
        metavar="NAME=PATH",
    ),
    _Option(
        "--controlnet",
        "controlnets",
        "load a ControlNet (diffusers folder or single file) with the model; jobs name it "
        "in params.controls (repeatable)",
        repeatable=True,
        metavar="NAME=PATH",
    ),
    _Option(
        "--preview-decoder",
        "preview_decoder",
        "an AutoencoderTiny (TAESD) folder: image previews become real decodes",
        metavar="DIR",
    ),
    _Option(
        "--max-queue",
        "max_queue",
        "jobs that may wait for the engine (default 64)",
        int,
        metavar="N",
    ),
    _Option(
        "--max-connections",
        "max_connections",
        "open sessions at most (default 1000)",
        int,
        metavar="N",
    ),
    _Option(
        "--drain-timeout",
        "drain_timeout",
        "seconds jobs may run on after SIGTERM (default 30)",
        float,
        metavar="SECONDS",
    ),
    _Option(
        "--send-timeout",
        "send_timeout",
        "seconds a client may leave messages unread before it is disconnected (default 30)",
        float,
        metavar="SECONDS",
    ),
    _Option(
        "--resume-window",
        "resume_window",
        "seconds a resumable session outlives its connection (default 30)",
        float,
        metavar="SECONDS",
    ),
    _Option(
        "--max-jobs-per-session",
        "max_jobs_per_session",
        "unfinished jobs per session (default 8)",
        int,
        metavar="N",
    ),
    _Option("--max-width", "max_width", "largest width (default 1024)", int, metavar="PX"),
    _Option("--max-height", "max_height", "largest height (default 1024)", int, metavar="PX"),
    _Option("--max-steps", "max_steps", "most denoising steps (default 150)", int, metavar="N"),
    _Option("--max-images", "max_images", "most images per job (default 4)", int, metavar="N"),
    _Option(
        "--max-message-bytes",
        "max_message_bytes",
        "largest WebSocket message, either way (default 32 MiB; must hold the largest result)",
        int,
        metavar="BYTES",
    ),
    _Option(
        "--max-batch",
        "max_batch",
        "rows of one UNet call shared by running jobs; 1 runs one job at a time "
        "(default: 8 on CPU, 16 on CUDA)",
        int,
        metavar="N",
    ),
    _Option(
        "--cpu-threads",
        "cpu_threads",
        "torch threads when running on CPU (default: torch's, one per physical core)",
        int,
        metavar="N",
    ),
    _Option(
        "--engines",
        "engines",
        "run N engine cores in Ray actors, one per GPU (or CPU slot), each loading the "
        "model; needs the latentcast[ray] extra (default 0: one engine in this process)",
        int,
        metavar="N",
    ),
    _Option(
        "--ray-address",
        "ray_address",
        "place the engines on this running Ray cluster (auto, ray://HOST:10001) instead of "
        "starting a local Ray runtime",
        metavar="ADDR",
    ),
    _Option(
        "--log-level",
        "log_level",
        "debug, info, warning or error (default info)",
        choices=("debug", "info", "warning", "error"),
    ),
)


def _env_name(option: _Option) -> str:
    return ENV_PREFIX + option.flag.removeprefix("--").replace("-", "_").upper()


class CommandParser(argparse.ArgumentParser):
    """The parser of one subcommand.

    argparse leaves an unknown option to the top-level parser, which prints the top-level
    usage; here the subcommand reports it itself, with its own usage and the closest
    option name ("did you mean --steps?").
    """

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(unrecognized_message(self, extras))
        return parsed, extras


def unrecognized_message(parser: argparse.ArgumentParser, extras: Sequence[str]) -> str:
    """``unrecognized arguments: ...``, with a close match for each unknown option."""
    known = [flag for flag in parser._option_string_actions if flag.startswith("--")]
    hints = []
    for extra in extras:
        name = extra.split("=", 1)[0]
        if name.startswith("--"):
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean {close[0]} (not {name})?")
    message = f"unrecognized arguments: {' '.join(extras)}"
    return f"{message}; {' '.join(hints)}" if hints else message


def build_parser() -> argparse.ArgumentParser:
    from latentcast.client.cli import add_generate_command

    parser = argparse.ArgumentParser(
        prog="latentcast",
        description="Real-time streaming server for diffusion image generation.",
    )
    parser.add_argument("--version", action="version", version=f"latentcast {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    serve = commands.add_parser(
        "serve",
        help="run the WebSocket server",
        description=(
            "Serve protocol v1 at ws://HOST:PORT/v1/ws, with /health, /ready and /metrics on "
            f"the same port. Each option may also be set as {ENV_PREFIX}<NAME> in the "
            "environment (repeatable ones comma-separated); the command line wins."
        ),
    )
    for option in SERVE_OPTIONS:
        serve.add_argument(
            option.flag,
            dest=option.dest,
            type=option.type,
            action="append" if option.repeatable else "store",
            choices=option.choices,
            help=f"{option.help} [env {_env_name(option)}]",
            metavar=option.metavar,
        )
    serve.set_defaults(serve_parser=serve)
    add_generate_command(commands)
    return parser


def config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    """Command line over environment over defaults, validated into one ServerConfig."""
    from .config import ServerConfig

    values: dict[str, Any] = {}
    for option in SERVE_OPTIONS:
        value = getattr(args, option.dest)
        if value is None and _env_name(option) in environ:
            raw = environ[_env_name(option)]
            value = (
                [part.strip() for part in raw.split(",") if part.strip()]
                if option.repeatable
                else raw
            )
        if value is not None:
            values[option.dest] = tuple(value) if option.repeatable else value
    return ServerConfig.model_validate(values)


def listen_problem(host: str, port: int) -> str | None:
    """Why the server could not listen on ``host:port``, found out in a few milliseconds.

    Binds (without listening) every address the server would, with the same options as
    asyncio's server, and closes them at once. None when all of them bind, and for
    port 0 (the system picks a free port).
    """
    if port == 0:
        return None
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as exc:
        return f"cannot listen on {host!r}: {getattr(exc, 'strerror', None) or exc}; check --host"
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            if os.name == "posix":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPPROTO_IPV6"):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        return describe_listen_error(host, port, exc)
    finally:
        for sock in sockets:
            sock.close()
    return None


def describe_listen_error(host: str, port: int, exc: OSError) -> str | None:
    """One line for a bind error (None for an error that is not about the address)."""
    if exc.errno == errno.EADDRINUSE:
        return (
            f"port {port} on {host} is already in use (another latentcast serve?): choose "
            "another with --port N, or --port 0 for a free one"
        )
    if exc.errno == errno.EACCES:
        return (
            f"not allowed to listen on port {port} (ports below 1024 need privileges): "
            "choose another with --port N, or --port 0 for a free one"
        )
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {host}: not an address of this machine; check --host"
    return None


def _quiet_libraries() -> None:
    """No download/loading progress bars from diffusers and transformers in server logs."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def _fail(message: str) -> NoReturn:
    print(f"latentcast: error: {message}", file=sys.stderr)
    sys.exit(EXIT_ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C before the command's own handling (imports)
        print("latentcast: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        from latentcast.client.cli import run_generate

        return run_generate(args)
    from pydantic import ValidationError

    serve: argparse.ArgumentParser = args.serve_parser
    try:
        config = config_from(args, os.environ)
    except ValidationError as exc:
        flags = {option.dest: option.flag for option in SERVE_OPTIONS}
        problems = "; ".join(
            (
                f"{flags.get(str(error['loc'][0]), '.'.join(str(p) for p in error['loc']))}: "
                if error["loc"]
                else ""
            )
            + error["msg"].removeprefix("Value error, ")
            for error in exc.errors()
        )
        serve.error(f"invalid configuration: {problems}")
    if config.largest_result_bytes() > config.max_message_bytes:
        serve.error(
            f"--max-message-bytes {config.max_message_bytes} cannot hold the largest result "
            f"these limits allow (~{config.largest_result_bytes()} bytes): raise it, or lower "
            "--max-width / --max-height / --max-images"
        )
    problem = listen_problem(config.host, config.port)
    if problem is not None:
        _fail(problem)

    import logging

    logging.basicConfig(
        stream=sys.stderr,
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)
    _quiet_libraries()
    from .app import run_and_exit  # imports torch: after argument errors are reported

    try:
        run_and_exit(config)  # ends the process with the server's exit status
    except OSError as exc:
        # The port was taken between the check above and the real bind.
        message = describe_listen_error(config.host, config.port, exc)
        if message is None:
            raise
        _fail(message)


if __name__ == "__main__":
    sys.exit(main())
