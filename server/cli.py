"""``latentcast`` command line: ``latentcast serve [options]`` and ``latentcast generate``.

``generate`` is the Python client's (:mod:`latentcast.client.cli`); only ``serve`` lives here.

Every option can also come from the environment as ``LATENTCAST_<NAME>`` (for example
``LATENTCAST_PORT=9000``; repeatable options comma-separated); the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from latentcast.client.cli import add_generate_command, run_generate

from . import __version__
from .config import ServerConfig

ENV_PREFIX = "LATENTCAST_"


@dataclass(frozen=True)
class _Option:
    flag: str
    dest: str
    help: str
    type: Any = str
    repeatable: bool = False
    choices: Sequence[str] | None = None


SERVE_OPTIONS = (
    _Option("--host", "host", "interface to listen on (default 127.0.0.1)"),
    _Option("--port", "port", "TCP port; 0 picks a free one (default 8765)", int),
    _Option(
        "--model",
        "model",
        "'tiny' (built in, no download), a diffusers folder, a .safetensors/.ckpt "
        "checkpoint, or a model id (default tiny)",
    ),
    _Option("--device", "device", "auto, cpu, cuda, cuda:N or mps (default auto)"),
    _Option(
        "--dtype",
        "dtype",
        "weights dtype (default: float16 on GPUs, float32 on CPU)",
        choices=("float16", "bfloat16", "float32"),
    ),
    _Option(
        "--cache-dir", "cache_dir", "where the tiny model is built (default ~/.cache/latentcast)"
    ),
    _Option(
        "--token", "tokens", "accept this bearer token (repeatable; none: no auth)", repeatable=True
    ),
    _Option(
        "--allow-origin",
        "allow_origins",
        "allow browser pages from this origin, e.g. https://app.example (repeatable; none: any)",
        repeatable=True,
    ),
    _Option(
        "--model-config",
        "checkpoint_config",
        "for a single-file checkpoint: a local diffusers folder (or tiny / tiny-sdxl) with "
        "its configs, so nothing is fetched from a hub",
    ),
    _Option(
        "--lora",
        "loras",
        "load a LoRA adapter at start as NAME=PATH; jobs select it by name (repeatable)",
        repeatable=True,
    ),
    _Option(
        "--preview-decoder",
        "preview_decoder",
        "an AutoencoderTiny (TAESD) folder: image previews become real decodes",
    ),
    _Option("--max-queue", "max_queue", "jobs that may wait for the engine (default 64)", int),
    _Option("--max-connections", "max_connections", "open sessions at most (default 1000)", int),
    _Option(
        "--drain-timeout",
        "drain_timeout",
        "seconds jobs may run on after SIGTERM (default 30)",
        float,
    ),
    _Option(
        "--send-timeout",
        "send_timeout",
        "seconds a client may leave messages unread before it is disconnected (default 30)",
        float,
    ),
    _Option(
        "--max-jobs-per-session",
        "max_jobs_per_session",
        "unfinished jobs per session (default 8)",
        int,
    ),
    _Option("--max-width", "max_width", "largest width (default 1024)", int),
    _Option("--max-height", "max_height", "largest height (default 1024)", int),
    _Option("--max-steps", "max_steps", "most denoising steps (default 150)", int),
    _Option("--max-images", "max_images", "most images per job (default 4)", int),
    _Option(
        "--max-message-bytes",
        "max_message_bytes",
        "largest WebSocket message (default 64 MiB)",
        int,
    ),
    _Option(
        "--cpu-threads",
        "cpu_threads",
        "torch threads when running on CPU (default: all cores but one)",
        int,
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentcast",
        description="Real-time streaming server for diffusion image generation.",
    )
    parser.add_argument("--version", action="version", version=f"latentcast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
            metavar=option.dest.upper().rstrip("S") if option.repeatable else None,
        )
    add_generate_command(commands)
    return parser


def config_from(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerConfig:
    """Command line over environment over defaults, validated into one ServerConfig."""
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


def _quiet_libraries() -> None:
    """No download/loading progress bars from diffusers and transformers in server logs."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "generate":
        return run_generate(args)
    try:
        config = config_from(args, os.environ)
    except ValidationError as exc:
        flags = {option.dest: option.flag for option in SERVE_OPTIONS}
        problems = "; ".join(
            f"{flags.get(str(error['loc'][0]), '.'.join(str(p) for p in error['loc']))}: "
            f"{error['msg']}"
            for error in exc.errors()
        )
        parser.error(f"invalid configuration: {problems}")
    logging.basicConfig(
        stream=sys.stderr,
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    logging.getLogger("websockets").setLevel(logging.WARNING)
    _quiet_libraries()
    from .app import run  # imports torch: after argument errors are reported

    return asyncio.run(run(config))


if __name__ == "__main__":
    sys.exit(main())
