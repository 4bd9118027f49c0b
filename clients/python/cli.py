"""``latentcast generate "PROMPT" -o out.png``: one job from the command line.

Wired into the ``latentcast`` command by :mod:`latentcast.server.cli`, which only adds
the subcommand (:func:`add_generate_command`) and hands it the parsed arguments
(:func:`run_generate`).

Exit status: 0 the images were written; 1 an error (server unreachable, token refused,
request rejected, job failed, connection lost; one line on stderr that says what to do);
2 a bad command line; 130 interrupted (Ctrl-C: the job is cancelled on the server first).

A server that is still loading its model (HTTP 503 ``loading``) is waited for, up to
``--wait-ready`` seconds, with a spinner.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from PIL import Image
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.status import Status

from latentcast.protocol import (
    Cancelled,
    Complete,
    Error,
    ImagePreview,
    LatentPreview,
    ModelInfo,
    Queued,
    Started,
)
from latentcast.protocol import (
    Progress as ProgressMessage,
)

from .connection import DEFAULT_URL, WS_PATH, Client, connect
from .errors import (
    AuthenticationFailed,
    ConnectFailed,
    ConnectionLost,
    JobCancelled,
    JobFailed,
    LatentcastError,
    RequestRejected,
    ServerUnavailable,
)
from .images import GeneratedImage, latent_to_pil
from .job import Job, Result

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

URL_ENV = "LATENTCAST_URL"
TOKEN_ENV = "LATENTCAST_TOKEN"

#: How long Ctrl-C waits at least for the server's ``cancelled`` before leaving anyway.
#: The server stops a running job at the end of its current step, so with slow steps
#: the wait grows to one and a half steps (see :func:`cancel_grace`)...
CANCEL_GRACE = 5.0
#: ...but never beyond this.
CANCEL_GRACE_MAX = 60.0

#: Default of ``--wait-ready``: how long to wait for a server that is loading its model.
WAIT_READY = 60.0
#: How often the handshake is retried while the server is loading.
READY_POLL = 0.5

#: How a server is started, for the "nothing listens there" error.
START_HINT = "start one with 'latentcast serve' (or 'make serve' in a source checkout)"

FORMAT_BY_SUFFIX = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}

#: Request fields (as the protocol names them in errors) -> the option that sets them.
FLAG_BY_FIELD = {
    "prompt": "PROMPT",
    "negative_prompt": "--negative-prompt",
    "width": "--width",
    "height": "--height",
    "steps": "--steps",
    "guidance_scale": "--guidance-scale",
    "seed": "--seed",
    "scheduler": "--scheduler",
    "num_images": "--num-images",
    "init_image": "--init-image",
    "strength": "--strength",
    "mask": "--mask",
    "loras": "--lora",
    "controls": "--control",
    "model": "--model",
    "preview": "--preview",
    "output": "--output-format/--quality",
}

EPILOG = f"""\
output files:
  -o out.png writes out.png; with --num-images N the others are out-1.png ... out-(N-1).png.
  -o may also be a pattern with {{index}} and {{seed}}, e.g. -o "fox-{{seed}}.webp".
  The format follows the suffix (.png, .jpg/.jpeg, .webp) unless --output-format is given.

environment:
  {URL_ENV}    server URL when --url is not given (default {DEFAULT_URL})
  {TOKEN_ENV}  bearer token when --token is not given

exit status:
  0 images written, 1 error (one line on stderr), 2 bad command line,
  130 interrupted with Ctrl-C (the job is cancelled on the server first)
"""


# --------------------------------------------------------------------------- parser


def _lora(text: str) -> tuple[str, float]:
    name, sep, scale = text.partition("=")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME=SCALE, got {text!r}")
    if not sep:
        return name, 1.0
    try:
        return name, float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"the scale in {text!r} is not a number") from None


def _control(text: str) -> tuple[str, bytes, float]:
    """``NAME=IMAGE[:SCALE]``: the ControlNet's name, the image file's bytes, the scale."""
    name, sep, rest = text.partition("=")
    if not name or not sep or not rest:
        raise argparse.ArgumentTypeError(f"expected NAME=IMAGE or NAME=IMAGE:SCALE, got {text!r}")
    path, colon, scale_text = rest.rpartition(":")
    scale = 1.0
    if colon and path:
        try:
            scale = float(scale_text)
        except ValueError:
            path = rest  # a ':' in the file name, not a scale
    else:
        path = rest
    return name, _input_file(path), scale


def _input_file(text: str) -> bytes:
    try:
        return Path(text).read_bytes()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc.strerror or exc}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds >= 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_generate_command(commands: Any) -> argparse.ArgumentParser:
    """Add ``generate`` to the ``latentcast`` subcommands (an argparse subparsers object)."""
    parser: argparse.ArgumentParser = commands.add_parser(
        "generate",
        help="generate images on a running server",
        description=(
            "Submit one job to a latentcast server, show its progress, and write the images."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("prompt", metavar="PROMPT", help="what to draw")
    parser.add_argument(
        "-o",
        "--output",
        default="latentcast.png",
        metavar="PATH",
        help="where to write the image (default latentcast.png; see 'output files')",
    )

    connection = parser.add_argument_group("server")
    connection.add_argument(
        "--url",
        default=None,
        help=f"server WebSocket URL [env {URL_ENV}] (default {DEFAULT_URL})",
    )
    connection.add_argument("--token", default=None, help=f"bearer token [env {TOKEN_ENV}]")
    connection.add_argument(
        "--connect-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up connecting after this long (default 10)",
    )
    connection.add_argument(
        "--wait-ready",
        type=_seconds,
        default=WAIT_READY,
        metavar="SECONDS",
        help=(
            "while the server is still loading its model, wait this long for it "
            f"(default {WAIT_READY:g}; 0: fail at once)"
        ),
    )

    request = parser.add_argument_group(
        "request (omitted: the server's defaults)",
        "The default size is the model's own: 64x64 on the built-in tiny models, 512x512 "
        "on SD 1.x, 1024x1024 on SDXL.",
    )
    request.add_argument("--negative-prompt", metavar="TEXT", help="what not to draw")
    request.add_argument(
        "--width", type=int, metavar="PX", help="multiple of 8 (default: the model's, 64 on tiny)"
    )
    request.add_argument(
        "--height", type=int, metavar="PX", help="multiple of 8 (default: the model's, 64 on tiny)"
    )
    request.add_argument("--steps", type=int, metavar="N", help="denoising steps")
    request.add_argument(
        "--guidance-scale", type=float, metavar="CFG", help="0 to 30 (<= 1: no guidance)"
    )
    request.add_argument("--seed", type=int, metavar="N", help="0 to 2^32-1 (default: random)")
    request.add_argument("--scheduler", metavar="NAME", help="one of the model's schedulers")
    request.add_argument(
        "--num-images", type=int, metavar="N", help="images in this job (seeds seed, seed+1, ...)"
    )
    request.add_argument(
        "--init-image", type=_input_file, metavar="PATH", help="start from this image (img2img)"
    )
    request.add_argument(
        "--strength", type=float, metavar="S", help="0 < S <= 1: how much to change the init image"
    )
    request.add_argument(
        "--mask",
        type=_input_file,
        metavar="PATH",
        help="white = repaint, black = keep (inpaint; needs --init-image)",
    )
    request.add_argument(
        "--lora",
        type=_lora,
        action="append",
        metavar="NAME[=SCALE]",
        help="apply one of the server's LoRAs (repeatable; scale default 1)",
    )
    request.add_argument(
        "--control",
        type=_control,
        action="append",
        metavar="NAME=IMAGE[:SCALE]",
        help=(
            "steer the job with the server's ControlNet NAME and this image file "
            "(repeatable; scale 0 to 2, default 1)"
        ),
    )
    request.add_argument(
        "--model",
        metavar="NAME",
        help="one of the server's models (default: the server's default model)",
    )

    output = parser.add_argument_group("output")
    output.add_argument(
        "--output-format",
        choices=("png", "jpeg", "webp"),
        help="image format (default: from the -o suffix)",
    )
    output.add_argument(
        "--quality", type=int, metavar="Q", help="1 to 100 for jpeg and webp (default 90)"
    )
    output.add_argument(
        "--preview-dir",
        type=Path,
        metavar="DIR",
        help="save previews here as they arrive (step-NNNN.png / .jpg)",
    )
    output.add_argument(
        "--preview",
        choices=("latent", "image"),
        help=(
            "preview kind for --preview-dir (default latent, turned into PNG with the "
            "model's latent_rgb factors; image when the model has none)"
        ),
    )
    output.add_argument(
        "--preview-every",
        type=_positive_int,
        default=1,
        metavar="N",
        help="a preview every N steps (default 1)",
    )
    output.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bar, only errors on stderr"
    )
    parser.set_defaults(generate_parser=parser)
    return parser


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class _Settings:
    """The command line, checked and resolved (environment included)."""

    prompt: str
    url: str
    token: str | None
    connect_timeout: float
    wait_ready: float
    output: str
    output_format: str
    quality: int | None
    preview_dir: Path | None
    preview_kind: str | None
    preview_every: int
    quiet: bool
    params: dict[str, Any] = field(default_factory=dict)


def _settings(args: argparse.Namespace, environ: Mapping[str, str]) -> _Settings:
    """Check what argparse cannot; a problem exits with status 2 through the parser."""
    parser: argparse.ArgumentParser = args.generate_parser
    output = args.output
    suffix = Path(output).suffix.lower()
    output_format = args.output_format or FORMAT_BY_SUFFIX.get(suffix or ".png")
    if output_format is None:
        parser.error(
            f"cannot tell the image format from {output!r}: use a .png, .jpg or .webp name "
            "or --output-format"
        )
    try:
        output.format(index=0, seed=0)
    except (KeyError, IndexError, ValueError) as exc:
        parser.error(f"-o {output!r}: only {{index}} and {{seed}} may be used ({exc})")
    parent = Path(output.format(index=0, seed=0)).parent
    if parent.exists() and not parent.is_dir():
        parser.error(f"-o {output!r}: {str(parent)!r} is a file, not a folder")
    if args.mask is not None and args.init_image is None:
        parser.error("--mask needs --init-image")
    if args.preview is not None and args.preview_dir is None:
        parser.error("--preview needs --preview-dir")
    params = {
        "negative_prompt": args.negative_prompt,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "scheduler": args.scheduler,
        "num_images": args.num_images,
        "init_image": args.init_image,
        "strength": args.strength,
        "mask": args.mask,
        "loras": args.lora,
        "controls": args.control,
        "model": args.model,
    }
    return _Settings(
        prompt=args.prompt,
        url=normalize_url(args.url or environ.get(URL_ENV) or DEFAULT_URL),
        token=args.token or environ.get(TOKEN_ENV) or None,
        connect_timeout=args.connect_timeout,
        wait_ready=args.wait_ready,
        output=output,
        output_format=output_format,
        quality=args.quality,
        preview_dir=args.preview_dir,
        preview_kind=args.preview,
        preview_every=args.preview_every,
        quiet=args.quiet,
        params={key: value for key, value in params.items() if value is not None},
    )


def normalize_url(url: str) -> str:
    """Accept http(s):// for ws(s):// and a bare host:port for the /v1/ws endpoint."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else WS_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, parts.fragment))


def output_paths(pattern: str, images: list[GeneratedImage]) -> list[Path]:
    """Where each image goes: ``out.png, out-1.png, ...``, or the {index}/{seed} pattern."""
    if "{" in pattern:
        paths = [Path(pattern.format(index=k, seed=image.seed)) for k, image in enumerate(images)]
        if len(set(paths)) == len(paths):
            return paths
        pattern = pattern.format(index=0, seed=images[0].seed)  # the same name for all
    base = Path(pattern)
    return [base] + [base.with_name(f"{base.stem}-{k}{base.suffix}") for k in range(1, len(images))]


# --------------------------------------------------------------------------- running


@dataclass
class _Run:
    """What the interrupt handler needs to know about the job in flight."""

    job: Job | None = None
    #: True from the moment the submit is sent.
    submitted: bool = False
    last_step: int = 0
    display: _Display | None = None
    #: time.monotonic() of ``started`` or of the latest ``progress``; None before started.
    last_step_at: float | None = None
    #: The longest time between two step reports seen so far.
    slowest_step: float = 0.0

    def step_reported(self) -> None:
        now = time.monotonic()
        if self.last_step_at is not None:
            self.slowest_step = max(self.slowest_step, now - self.last_step_at)
        self.last_step_at = now

    def step_seconds(self) -> float | None:
        """How long a step may take, from what was seen; None before the job started."""
        if self.last_step_at is None:
            return None
        return max(self.slowest_step, time.monotonic() - self.last_step_at)


def cancel_grace(step_seconds: float | None) -> float:
    """How long Ctrl-C waits for ``cancelled``.

    The server stops a running job at the end of its current step (at once when it is
    still queued), so the wait covers one and a half of the slowest steps seen, at least
    CANCEL_GRACE and at most CANCEL_GRACE_MAX seconds.
    """
    if step_seconds is None:
        return CANCEL_GRACE
    return min(CANCEL_GRACE_MAX, max(CANCEL_GRACE, 1.5 * step_seconds + 1.0))


class _Display:
    """The progress bar (rich, on stderr), or nothing with --quiet."""

    def __init__(self, console: Console, quiet: bool) -> None:
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            console=console,
            disable=quiet,
            transient=False,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> _Display:
        self._progress.start()
        self._task = self._progress.add_task("queued", total=None)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._progress.stop()

    def update(self, description: str | None = None, **fields: Any) -> None:
        assert self._task is not None
        self._progress.update(self._task, description=description, **fields)


async def _generate(settings: _Settings, run: _Run, console: Console) -> list[Path]:
    """Connect, submit, follow the job, write the images; the paths written."""
    async with await _connect(settings, console) as client:
        preview_kind = _preview_kind(settings, client)
        if settings.preview_dir is not None:
            settings.preview_dir.mkdir(parents=True, exist_ok=True)
        run.submitted = True
        job = await client.submit(
            settings.prompt,
            **settings.params,
            preview=preview_kind or "none",
            preview_every=settings.preview_every if preview_kind else None,
            output_format=settings.output_format,
            output_quality=settings.quality,
        )
        run.job = job
        with _Display(console, settings.quiet) as display:
            run.display = display
            await _follow(client, job, settings, run, display, console)
            result = await job.result()
    return _write(result, settings.output)


async def _connect(settings: _Settings, console: Console) -> Client:
    """Open the session; a server still loading its model is waited for (--wait-ready)."""
    started = time.monotonic()
    spinner: Status | None = None
    try:
        while True:
            try:
                return await connect(
                    settings.url, settings.token, open_timeout=settings.connect_timeout
                )
            except ServerUnavailable as exc:
                if exc.reason != "loading":
                    raise
                waited = time.monotonic() - started
                if waited >= settings.wait_ready:
                    raise _still_loading(settings) from None
                text = (
                    f"waiting for the server at {settings.url} to load its model "
                    f"(up to {settings.wait_ready:g} s)"
                )
                if spinner is None and not settings.quiet:
                    if console.is_terminal:
                        spinner = console.status(text)
                        spinner.start()
                    else:
                        console.print(text, markup=False, highlight=False, soft_wrap=True)
                if spinner is not None:
                    spinner.update(f"{text}: {waited:.0f} s")
                await asyncio.sleep(min(READY_POLL, settings.wait_ready - waited))
    finally:
        if spinner is not None:
            spinner.stop()


def _still_loading(settings: _Settings) -> LatentcastError:
    if settings.wait_ready <= 0:
        return LatentcastError(
            f"the server at {settings.url} is still loading its model: try again in a "
            "moment, or let --wait-ready SECONDS wait for it"
        )
    return LatentcastError(
        f"the server at {settings.url} is still loading its model after "
        f"{settings.wait_ready:g} s: wait longer with --wait-ready SECONDS, or look at the "
        "server's log"
    )


def _preview_kind(settings: _Settings, client: Client) -> str | None:
    if settings.preview_dir is None:
        return None
    model = _model_info(client, settings)
    if settings.preview_kind == "latent" and model.latent_rgb is None:
        raise LatentcastError(
            f"model {model.name!r} has no latent_rgb factors to turn latent "
            "previews into pictures: use --preview image"
        )
    if settings.preview_kind is not None:
        return settings.preview_kind
    return "latent" if model.latent_rgb is not None else "image"


def _model_info(client: Client, settings: _Settings) -> ModelInfo:
    """The model the job runs on (--model), as the server describes it."""
    name = settings.params.get("model")
    try:
        return client.model_info(name)
    except KeyError:
        # An unknown --model is refused by the submit's own check, with its field.
        return client.welcome.model


async def _follow(
    client: Client, job: Job, settings: _Settings, run: _Run, display: _Display, console: Console
) -> None:
    """Show the job's events as they come, saving previews."""
    display.update(f"queued ({job.position} ahead)" if job.position else "queued")
    async for event in job:
        if isinstance(event, Queued):
            display.update(f"queued ({event.position} ahead)" if event.position else "queued")
        elif isinstance(event, Started):
            run.step_reported()
            display.update("generating", total=event.steps, completed=0)
            for warning in event.warnings or ():
                console.print(f"warning: {warning}", markup=False, highlight=False, soft_wrap=True)
        elif isinstance(event, ProgressMessage):
            run.step_reported()
            run.last_step = event.step
            display.update(total=event.steps, completed=event.step)
        elif isinstance(event, LatentPreview | ImagePreview):
            run.last_step = max(run.last_step, event.step)
            assert settings.preview_dir is not None
            _save_preview(client, event, settings.preview_dir, settings)
        elif isinstance(event, Complete):
            display.update("done")
        elif isinstance(event, Cancelled):
            display.update(f"cancelled ({event.reason})")


def _save_preview(
    client: Client, preview: LatentPreview | ImagePreview, folder: Path, settings: _Settings
) -> Path:
    if isinstance(preview, ImagePreview):
        suffix = {"jpeg": ".jpg"}.get(preview.format, f".{preview.format}")
        path = folder / f"step-{preview.step:04d}{suffix}"
        path.write_bytes(preview.data)
        return path
    model = _model_info(client, settings)
    assert model.latent_rgb is not None
    path = folder / f"step-{preview.step:04d}.png"
    image = latent_to_pil(preview, model.latent_rgb)
    # One latent pixel covers vae_scale_factor^2 image pixels: show it at the image's size.
    scale = max(1, model.vae_scale_factor)
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    image.save(path, format="PNG")
    return path


def _write(result: Result, pattern: str) -> list[Path]:
    paths = output_paths(pattern, result.images)
    for image, path in zip(result.images, paths, strict=True):
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return paths


async def _main(settings: _Settings, console: Console) -> int:
    """Run the job; on SIGINT cancel it, wait briefly for the server, return 130."""
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    loop.add_signal_handler(signal.SIGINT, interrupted.set)
    run = _Run()
    started = time.monotonic()
    work = asyncio.create_task(_generate(settings, run, console))
    interrupt = asyncio.create_task(interrupted.wait())
    try:
        await asyncio.wait({work, interrupt}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            paths = work.result()
            for path in paths:
                print(path)
            if not settings.quiet:
                console.print(
                    f"wrote {len(paths)} image{'s' if len(paths) > 1 else ''} in "
                    f"{time.monotonic() - started:.1f} s",
                    highlight=False,
                    soft_wrap=True,
                )
            return EXIT_OK
        interrupted.clear()
        return await _interrupt(work, run, interrupted, console)
    finally:
        interrupt.cancel()
        loop.remove_signal_handler(signal.SIGINT)


async def _ended(job: Job) -> None:
    """Until the job has ended, however it ends."""
    with contextlib.suppress(LatentcastError):
        await job.wait()


async def _interrupt(
    work: asyncio.Task[list[Path]], run: _Run, again: asyncio.Event, console: Console
) -> int:
    """Cancel the job on the server and give it :func:`cancel_grace` seconds to say so."""
    job = run.job
    if job is None:
        outcome = (
            "before the submit was answered (closing the connection cancels the job)"
            if run.submitted
            else "nothing was submitted"
        )
    elif job.done:
        outcome = f"job {job.id} had already ended"
    else:
        grace = cancel_grace(run.step_seconds())
        if run.display is not None:
            run.display.update(f"cancelling (up to {grace:.0f} s; Ctrl-C again to leave now)")
        started = time.monotonic()
        await job.cancel()
        ended = asyncio.create_task(_ended(job))
        second = asyncio.create_task(again.wait())
        await asyncio.wait({ended, second}, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
        second.cancel()
        ended.cancel()
        waited = time.monotonic() - started
        if isinstance(job.terminal, Cancelled):
            outcome = f"job {job.id} cancelled at step {job.terminal.step}"
        elif isinstance(job.terminal, Complete):
            outcome = f"job {job.id} had already completed (not saved)"
        elif isinstance(job.terminal, Error):
            outcome = f"job {job.id} ended with {job.terminal.code}"
        elif job.done:
            outcome = (
                f"job {job.id}: the connection closed before the cancel was answered "
                "(the server cancels the jobs of a closed connection)"
            )
        elif again.is_set():
            outcome = (
                f"job {job.id}: left without waiting for the cancel (closing the connection "
                "cancels it)"
            )
        else:
            outcome = (
                f"job {job.id}: no answer to the cancel within {waited:.0f} s (the server "
                "stops a job at the end of a step; closing the connection cancels it)"
            )
    work.cancel()
    await asyncio.gather(work, return_exceptions=True)
    console.print(
        f"latentcast: interrupted; {outcome}", markup=False, highlight=False, soft_wrap=True
    )
    return EXIT_INTERRUPTED


def describe_error(error: LatentcastError) -> str:
    """One line for a person, naming the option behind a rejected field."""
    if isinstance(error, AuthenticationFailed):
        return f"{error.message} (use --token or {TOKEN_ENV})"
    if isinstance(error, ConnectFailed) and error.reason == "refused":
        return (
            f"no latentcast server answers at {error.url} (connection refused): {START_HINT}, "
            f"or pass --url (or set {URL_ENV}) with the address of a running one"
        )
    if isinstance(error, ServerUnavailable) and error.reason == "draining":
        return (
            f"the server at {error.url} is shutting down (draining) and takes no new jobs: "
            "wait for it to restart, or pass --url with another server"
        )
    if isinstance(error, ServerUnavailable) and error.reason == "connection_limit":
        return (
            f"the server at {error.url} is at its connection limit (its --max-connections): "
            "try again when a client has left"
        )
    if isinstance(error, ConnectFailed):
        return error.message
    if isinstance(error, RequestRejected):
        flag = ""
        if error.field:
            parts = error.field.split(".")
            key = parts[1] if parts[0] == "params" and len(parts) > 1 else parts[0]
            option = FLAG_BY_FIELD.get(key)
            flag = f" (field {error.field}{', option ' + option if option else ''})"
        return f"request rejected: {error.code}: {error.message}{flag}"
    if isinstance(error, JobFailed):
        return f"job failed: {error.code}: {error.message}"
    if isinstance(error, JobCancelled):
        return f"job cancelled by the server ({error.reason}) at step {error.step}"
    if isinstance(error, ConnectionLost):
        return f"connection lost: {error.message}"
    return str(error)


def run_generate(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    """Run ``latentcast generate`` with parsed arguments; the process exit status."""
    settings = _settings(args, os.environ if environ is None else environ)
    console = Console(stderr=True)
    try:
        return asyncio.run(_main(settings, console))
    except LatentcastError as exc:
        print(f"latentcast: error: {describe_error(exc)}", file=sys.stderr)
    except OSError as exc:
        name = f" {exc.filename}" if exc.filename else ""
        print(f"latentcast: error:{name} {exc.strerror or exc}", file=sys.stderr)
    except KeyboardInterrupt:  # a Ctrl-C before or after the loop's own handler
        print("latentcast: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_ERROR
