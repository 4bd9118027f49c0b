"""latentcast hostile-frame benchmark: event-loop stalls and memory per frame byte (issue 8).

Usage::

    python bench/bench_frames.py [--quick | --max-message-bytes N] [--kind SUBSTRING ...]
                                 [--cache-dir DIR]

PROTOCOL.md section 1: "No frame, whatever it holds, may stall other sessions". The goal
(issue 8): no frame up to ``max_message_bytes`` (the server's default: 32 MiB) stalls
another session's progress messages or ``/health`` for more than 100 ms, or makes the
server allocate more than a few times the frame's size.

(1) decoder    each frame kind through ``decode_client_message_in_steps`` in this process:
               CPU time per MiB, the longest step, tracemalloc's peak per frame byte, and
               the answer.
(2) server     one in-process server (tiny model) on 127.0.0.1. A client in a separate
               process builds the frame and sends it (so that building and masking it
               never run here); meanwhile this process records the event loop's worst
               lag (a 1 ms sleep probe), the worst gap between answers to ``GET /health``
               (polled over fresh TCP connections), the worst gap between two
               ``progress`` messages of another session's job (64x64 jobs of 150 steps,
               back to back; a gap across two jobs, which also holds the VAE decode and
               ``complete``, is recorded apart and not held against the goal),
               and the peak RSS growth (VmHWM, reset before each frame) per frame byte.
               First the same watchers run 10 s with no frame sent: the floor that the
               machine and the other session's own steps set.

(3) baseline   a websockets server with no latentcast code receives one message of zeros
               of the largest size, three times: its worst loop lag is what receiving the
               frame costs before anything of ours runs.

The large kinds are built at the server's default ``max_message_bytes`` (read from
``ServerConfig``), and the server runs with that limit. ``--max-message-bytes N`` measures
another limit (the server is configured with it); ``--quick`` is 16 MiB. Readable lines go
to stdout; the last line is one JSON object with every figure. Every wait has a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import msgpack

HOST = "127.0.0.1"
MiB = 2**20
WAIT = 300.0
GOAL_STALL_MS = 100.0
IDLE_S = 10.0  # how long the watchers run with no frame, for the floor
GOAL_RSS_FACTOR = 5.0  # "a few times the frame's size"
REPO = Path(__file__).resolve().parents[1]


def out(line: str = "") -> None:
    print(line, flush=True)


def default_max_message_bytes() -> int:
    """The server's configured default for ``--max-message-bytes``."""
    from latentcast.server.config import ServerConfig

    default: int = ServerConfig.model_fields["max_message_bytes"].default
    return default


# --------------------------------------------------------------------------- frames


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


MARKER = b"\x00<fill>\x00"


def submit(params: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"type": "submit", "id": "hostile", "params": params, **extra}


def _array(count: int) -> bytes:
    return b"\xdc" + count.to_bytes(2, "big")


def fill(leaf: bytes, budget: int) -> tuple[bytes, int]:
    """An array of nested arrays (at most 256 wide) of ``leaf`` (packed), nearly ``budget``
    bytes: as many of the largest full subtree as fit, then the rest filled the same way
    with smaller ones. Returns the bytes and how many levels of arrays they nest."""
    tree, levels = leaf, 0
    while 3 + 3 + 256 * len(tree) <= budget:
        tree, levels = _array(256) + tree * 256, levels + 1
    copies = max(1, min(255, (budget - 3) // len(tree)))
    rest = budget - 3 - copies * len(tree)
    if levels > 0 and rest >= 3 + len(leaf):
        extra, extra_levels = fill(leaf, rest)
        return _array(copies + 1) + tree * copies + extra, max(levels, extra_levels) + 1
    return _array(copies) + tree * copies, levels + 1


def with_fill(
    message: dict[str, Any], leaf: bytes, size: int, *, wrap: int = 0, copies: int = 1
) -> bytes:
    """``message`` (holding MARKER once) with MARKER replaced by a fill of ``leaf``, the
    whole frame at most ``size`` bytes: ``copies`` fills in an array when more than one,
    and ``wrap`` one-element arrays around it all."""
    frame = pack(message)
    budget = size - (len(frame) - len(pack(MARKER))) - wrap - 3
    filled, _ = fill(leaf, budget // copies)
    if copies > 1:
        filled = _array(copies) + filled * copies
    return frame.replace(pack(MARKER), b"\x91" * wrap + filled)


def deepest_fill(leaf: bytes, size: int) -> bytes:
    """Leaves at exactly 32 levels (the most allowed): a chain of arrays around a fill."""
    frame = pack(submit({"prompt": "x"}, junk=MARKER))
    _, levels = fill(leaf, size - (len(frame) - len(pack(MARKER))) - 3 - 32)
    # junk is 1 level down; the fill's leaves are ``levels`` further.
    return with_fill(submit({"prompt": "x"}, junk=MARKER), leaf, size, wrap=31 - levels)


def invalid_utf8_at_the_end(size: int) -> bytes:
    frame = with_fill(submit({"prompt": "x"}, junk=MARKER), b"\xa2ab", size)
    assert frame.endswith(b"\xa2ab")
    return frame[:-3] + b"\xa2\xff\xfe"


def copies_of_params() -> bytes:
    loras = b"\xa5loras" + pack([{"name": "detail", "scale": 2.0}] * 16)
    params = b"\xa6params" + b"\xde\x01\x00" + loras * 256
    return b"\xde\x01\x00" + pack("type") + pack("submit") + pack("id") + pack("j") + params * 254


def longest_strings() -> bytes:
    text = "p" * 2000
    return pack(
        {
            "type": "submit",
            "id": "i" * 2000,
            "replaces": text,
            "params": {
                "prompt": text,
                "negative_prompt": text,
                "scheduler": text,
                "loras": [{"name": text}] * 16,
                text: text,
            },
            "preview": {"format": text},
            "output": {"format": text},
        }
    )


def max_init_image(size: int) -> bytes:
    frame = pack(submit({"prompt": "x", "init_image": b""}))
    return pack(submit({"prompt": "x", "init_image": b"\x07" * (size - len(frame) - 3)}))


def max_prompt(size: int) -> bytes:
    frame = pack(submit({"prompt": ""}))
    return pack(submit({"prompt": "中" * ((size - len(frame) - 4) // 3)}))


@dataclass(frozen=True)
class Kind:
    name: str
    build: Callable[[int], bytes]  # size -> frame
    answer: tuple[str, str | None]  # expected (code, field)


KINDS = [
    Kind(
        "issue 8: 1 M nils in params.loras",
        lambda size: pack(submit({"prompt": "x", "loras": [None] * 1_000_000})),
        ("bad_frame", None),
    ),
    Kind(
        "issue 8: 1 M unknown keys in params",
        lambda size: pack(submit({"prompt": "x", **{f"k{i}": None for i in range(1_000_000)}})),
        ("bad_frame", None),
    ),
    Kind(
        "1 M levels of nesting",
        lambda size: pack(submit({"prompt": "x"}, junk=MARKER)).replace(
            pack(MARKER), b"\x91" * 1_000_000 + b"\xc0"
        ),
        ("bad_frame", None),
    ),
    Kind(
        "2,000 characters in every string",
        lambda size: longest_strings(),
        ("invalid_request", "id"),
    ),
    Kind(
        "254 params x 256 loras keys x 16 loras",
        lambda size: copies_of_params(),
        ("invalid_request", "params.prompt"),
    ),
    Kind("largest: one init_image", max_init_image, ("bad_image", None)),
    Kind(
        "largest: prompt of 3-byte characters",
        max_prompt,
        ("invalid_request", "params.prompt"),
    ),
    Kind(
        "largest: empty maps under an unknown key",
        lambda size: with_fill(submit({"prompt": "x"}, junk=MARKER), b"\x80", size),
        ("invalid_request", "junk"),
    ),
    Kind(
        "largest: empty lists in params",
        lambda size: with_fill(submit({"prompt": "x", "junk": MARKER}), b"\x90", size),
        ("invalid_request", "params.junk"),
    ),
    Kind(
        "largest: small ints in params.loras",
        lambda size: with_fill(submit({"prompt": "x", "loras": MARKER}), b"\x07", size, copies=17),
        ("invalid_request", "params.loras"),
    ),
    Kind(
        # The name comes first (this server has no LoRAs), but the scale must be read.
        "largest: 3-byte ints (300) as a lora's scale",
        lambda size: with_fill(
            submit({"prompt": "x", "loras": [{"name": "a", "scale": MARKER}]}),
            b"\xcd\x01\x2c",
            size,
        ),
        ("invalid_request", "params.loras.0.name"),
    ),
    Kind(
        "largest: floats 32 levels deep",
        lambda size: deepest_fill(pack(2.5), size),
        ("invalid_request", "junk"),
    ),
    Kind(
        "largest: 2-char strings, the last not UTF-8",
        invalid_utf8_at_the_end,
        ("bad_frame", None),
    ),
]


# --------------------------------------------------------------------------- (1) decoder


def measure_decoder(frame: bytes) -> dict[str, Any]:
    from latentcast.protocol import (
        ProtocolError,
        SubmitRules,
        decode_client_message_in_steps,
    )

    rules = SubmitRules(schedulers=("euler",), loras=("detail",))

    def run(trace: bool) -> tuple[float, float, int, Any]:
        steps = decode_client_message_in_steps(frame, rules)
        longest, count, answer = 0.0, 0, None
        started = time.process_time()
        while True:
            step_started = time.process_time()
            try:
                next(steps)
            except StopIteration:
                answer = ("ok", None)
                break
            except ProtocolError as error:
                answer = (error.code.value, error.field)
                break
            finally:
                longest = max(longest, time.process_time() - step_started)
                count += 1
        return time.process_time() - started, longest, count, answer

    cpu, longest, steps, answer = run(trace=False)
    tracemalloc.start()
    run(trace=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "cpu_s": round(cpu, 3),
        "cpu_ns_per_byte": round(cpu / len(frame) * 1e9, 1),
        "longest_step_ms": round(longest * 1000, 2),
        "steps": steps,
        "peak_bytes": peak,
        "peak_per_frame_byte": round(peak / len(frame), 2),
        "answer": list(answer),
    }


# --------------------------------------------------------------------------- (2) server


def client_main(url: str, kind_name: str, size: int) -> None:
    """In a separate process: build one frame, send it, print the answer as JSON."""
    from websockets.sync.client import connect

    kind = next(kind for kind in KINDS if kind.name == kind_name)
    frame = kind.build(size)
    with connect(url, max_size=None, compression=None, open_timeout=WAIT) as ws:
        ws.recv(timeout=WAIT)  # welcome
        sent = time.monotonic()
        ws.send(frame)
        reply = msgpack.unpackb(ws.recv(timeout=WAIT), raw=False)
        seconds = time.monotonic() - sent
    result = {"bytes": len(frame), "code": reply.get("code"), "field": reply.get("field")}
    print(json.dumps({**result, "answer_s": seconds}), flush=True)


@dataclass
class Watch:
    loop_lag_ms: float = 0.0
    health_gap_ms: float = 0.0
    health_answers: int = 0
    #: Between two progress messages of the same job.
    progress_gap_ms: float = 0.0
    progress_messages: int = 0
    #: From a job's last progress message to the next job's first.
    job_boundary_gap_ms: float = 0.0


async def probe_loop(watch: Watch, stop: asyncio.Event) -> None:
    while not stop.is_set():
        started = time.perf_counter()
        await asyncio.sleep(0.001)
        lag = (time.perf_counter() - started - 0.001) * 1000
        watch.loop_lag_ms = max(watch.loop_lag_ms, lag)


async def poll_health(port: int, watch: Watch, stop: asyncio.Event) -> None:
    last = time.perf_counter()
    while not stop.is_set():
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(f"GET /health HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        if not data.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"/health answered {data[:40]!r}")
        now = time.perf_counter()
        watch.health_gap_ms = max(watch.health_gap_ms, (now - last) * 1000)
        watch.health_answers += 1
        last = now
        await asyncio.sleep(0.005)


async def follow_progress(url: str, watch: Watch, stop: asyncio.Event) -> None:
    from websockets.asyncio.client import connect

    from latentcast.protocol import GenerationParams, Submit, decode_server_message, encode_message

    async with connect(url, max_size=None, compression=None) as ws:
        await ws.recv()  # welcome
        last: float | None = None
        job = 0
        while not stop.is_set():
            job += 1
            params = GenerationParams(prompt="a lighthouse", steps=150, width=64, height=64)
            await ws.send(encode_message(Submit(id=f"v{job}", params=params)))
            first = True
            while True:
                message = decode_server_message(await ws.recv())  # type: ignore[arg-type]
                now = time.perf_counter()
                if message.type == "progress":
                    if last is not None:
                        gap = (now - last) * 1000
                        # From one job's last step to the next job's first, the gap also
                        # holds the VAE decode, `complete` and a new submit: kept apart.
                        if first:
                            watch.job_boundary_gap_ms = max(watch.job_boundary_gap_ms, gap)
                        else:
                            watch.progress_gap_ms = max(watch.progress_gap_ms, gap)
                    last, first = now, False
                    watch.progress_messages += 1
                if message.type in ("complete", "cancelled", "error"):
                    break


def reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) * 1024
    return 0


async def measure_idle(server: Any, seconds: float) -> dict[str, Any]:
    """The same watchers with no frame sent: the floor that the machine, the engine and
    the watchers themselves set (a loaded machine raises it)."""
    watch = Watch()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(probe_loop(watch, stop)),
        asyncio.create_task(poll_health(server.port, watch, stop)),
        asyncio.create_task(follow_progress(server.ws_url, watch, stop)),
    ]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task.exception() is not None:
            raise RuntimeError(f"a watcher failed: {task.exception()!r}")
    return {key: round(value, 1) for key, value in asdict(watch).items()}


async def measure_server(server: Any, kind: Kind, size: int) -> dict[str, Any]:
    watch = Watch()
    stop = asyncio.Event()
    can_reset = reset_rss_peak()
    rss_before = rss("VmRSS")
    tasks = [
        asyncio.create_task(probe_loop(watch, stop)),
        asyncio.create_task(poll_health(server.port, watch, stop)),
        asyncio.create_task(follow_progress(server.ws_url, watch, stop)),
    ]
    try:
        await asyncio.sleep(0.5)
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--client",
            server.ws_url,
            kind.name,
            str(size),
            stdout=asyncio.subprocess.PIPE,
            cwd=REPO,
        )
        async with asyncio.timeout(WAIT):
            stdout, _ = await process.communicate()
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if task.exception() is not None:
            raise RuntimeError(f"a watcher failed: {task.exception()!r}")
    reply = json.loads(stdout.decode().strip().splitlines()[-1])
    growth = rss("VmHWM") - rss_before if can_reset else None
    return {
        "answer": [reply["code"], reply["field"]],
        "answer_s": round(reply["answer_s"], 3),
        **{key: round(value, 1) for key, value in asdict(watch).items()},
        "rss_growth_bytes": growth,
        "rss_growth_per_frame_byte": None if growth is None else round(growth / reply["bytes"], 2),
    }


async def measure_bare_websockets(size: int) -> float:
    """Worst loop lag (ms) of a websockets server with no latentcast code that receives one
    message of ``size`` bytes: what receiving the frame costs before anything decodes it."""
    from websockets.asyncio.server import serve

    received = asyncio.Event()

    async def handler(ws: Any) -> None:
        async for _ in ws:
            received.set()

    watch, stop = Watch(), asyncio.Event()
    async with serve(handler, HOST, 0, max_size=size, compression=None) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        probe = asyncio.create_task(probe_loop(watch, stop))
        code = (
            "import time\n"
            "from websockets.sync.client import connect\n"
            f"with connect('ws://{HOST}:{port}', max_size=None, compression=None) as ws:\n"
            f"    ws.send(bytes({size})); time.sleep(0.3)\n"
        )
        process = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
        async with asyncio.timeout(WAIT):
            await received.wait()
            await process.wait()
        stop.set()
        await probe
    return round(watch.loop_lag_ms, 1)


# --------------------------------------------------------------------------- main


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def server_config(size: int, cache_dir: Path | None) -> Any:
    """A server whose ``max_message_bytes`` is ``size``. Below the largest result the
    default limits allow, the image limits shrink to fit (the bench's jobs are 64x64)."""
    from latentcast.server.config import ServerConfig
    from latentcast.server.models import default_cache_dir

    options: dict[str, Any] = {
        "host": HOST,
        "port": 0,
        "cache_dir": cache_dir or default_cache_dir(),
        "max_message_bytes": size,
    }
    config = ServerConfig(**options)
    if config.largest_result_bytes() > size:
        config = ServerConfig(**options, max_width=256, max_height=256, max_images=1)
    return config


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from latentcast.server.app import Server

    default = default_max_message_bytes()
    size = 16 * MiB if args.quick else args.max_message_bytes or default
    kinds = [k for k in KINDS if not args.kind or any(s in k.name for s in args.kind)]
    summary: dict[str, Any] = {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "msgpack": version("msgpack"),
            "pydantic": version("pydantic"),
            "websockets": version("websockets"),
            "load_before": [round(x, 2) for x in os.getloadavg()],
        },
        "frame_size_limit": size,
        "server_default_max_message_bytes": default,
        "kinds": {},
    }
    out(
        f"frames up to {size / MiB:g} MiB (the server's default: {default / MiB:g} MiB); goal: "
        f"stall <= {GOAL_STALL_MS:.0f} ms, RSS growth <= {GOAL_RSS_FACTOR:g} x frame"
    )
    out("(1) the decoder alone")
    for kind in kinds:
        frame = kind.build(size)
        figures = measure_decoder(frame)
        figures["bytes"] = len(frame)
        figures["answer_ok"] = tuple(figures["answer"]) == kind.answer or (
            kind.answer[0] == "bad_image" and figures["answer"][0] == "ok"
        )
        summary["kinds"][kind.name] = {"decoder": figures}
        del frame
        out(
            f"  {kind.name}: {figures['bytes'] / MiB:.1f} MiB, {figures['cpu_s']:.3f} s CPU "
            f"({figures['cpu_ns_per_byte']} ns/byte), longest step "
            f"{figures['longest_step_ms']} ms of {figures['steps']}, peak "
            f"{figures['peak_per_frame_byte']} x frame -> {figures['answer']}"
        )
    config = server_config(size, args.cache_dir)
    out("(2) against a server, the frame sent from another process")
    worst_stall = 0.0
    worst_rss = 0.0
    async with Server(config) as server:
        async with asyncio.timeout(WAIT):
            await server.wait_ready()
        await measure_idle(server, 3.0)  # warm-up: the first jobs after loading are slower
        idle = await measure_idle(server, IDLE_S)
        summary["idle"] = idle
        out(
            f"  no frame ({IDLE_S:g} s, the floor): worst loop lag {idle['loop_lag_ms']} ms, "
            f"/health gap {idle['health_gap_ms']} ms, progress gap {idle['progress_gap_ms']} ms "
            f"(across two jobs {idle['job_boundary_gap_ms']} ms)"
        )
        for kind in kinds:
            figures = await measure_server(server, kind, size)
            figures["answer_ok"] = tuple(figures["answer"]) == kind.answer
            summary["kinds"][kind.name]["server"] = figures
            stall = max(
                figures["loop_lag_ms"], figures["health_gap_ms"], figures["progress_gap_ms"]
            )
            worst_stall = max(worst_stall, stall)
            per_byte = figures["rss_growth_per_frame_byte"]
            if per_byte is not None and summary["kinds"][kind.name]["decoder"]["bytes"] > 4 * MiB:
                worst_rss = max(worst_rss, per_byte)
            out(
                f"  {kind.name}: answered {figures['answer']} in {figures['answer_s']} s; worst "
                f"loop lag {figures['loop_lag_ms']} ms, /health gap {figures['health_gap_ms']} ms, "
                f"progress gap {figures['progress_gap_ms']} ms (across two jobs "
                f"{figures['job_boundary_gap_ms'] or '-'} ms); RSS "
                f"+{(figures['rss_growth_bytes'] or 0) / MiB:.0f} MiB ({per_byte} x frame)"
            )
    bare = [await measure_bare_websockets(size) for _ in range(3)]
    summary["bare_websockets_loop_lag_ms"] = bare
    summary["bare_websockets_loop_lag_ms_per_mib"] = round(max(bare) / (size / MiB), 2)
    out(
        f"(3) baseline: a bare websockets server receiving one {size / MiB:g} MiB message: "
        f"worst loop lag {' / '.join(f'{lag} ms' for lag in bare)} (three runs; at worst "
        f"{summary['bare_websockets_loop_lag_ms_per_mib']} ms per MiB)"
    )
    summary["worst_stall_ms"] = round(worst_stall, 1)
    summary["worst_rss_per_frame_byte_over_4MiB"] = worst_rss
    summary["stall_goal_met"] = worst_stall <= GOAL_STALL_MS
    summary["rss_goal_met"] = worst_rss <= GOAL_RSS_FACTOR
    summary["answers_ok"] = all(
        part.get("answer_ok", True) for k in summary["kinds"].values() for part in k.values()
    )
    summary["machine"]["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return summary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--quick", action="store_true", help="large kinds at 16 MiB")
    sizes.add_argument(
        "--max-message-bytes",
        type=int,
        default=None,
        metavar="N",
        help="configure the server with this limit and build the large kinds at it "
        "(default: the server's default)",
    )
    parser.add_argument("--kind", action="append", help="only kinds whose name contains this")
    parser.add_argument("--cache-dir", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--client"]:
        client_main(argv[1], argv[2], int(argv[3]))
        return 0
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    started = time.perf_counter()
    summary = asyncio.run(run(args))
    summary["total_s"] = round(time.perf_counter() - started, 1)
    out(
        f"worst stall {summary['worst_stall_ms']} ms (goal {GOAL_STALL_MS:.0f}: "
        f"{'met' if summary['stall_goal_met'] else 'MISSED'}); worst RSS growth "
        f"{summary['worst_rss_per_frame_byte_over_4MiB']} x frame (goal {GOAL_RSS_FACTOR:g}: "
        f"{'met' if summary['rss_goal_met'] else 'MISSED'}); answers "
        f"{'as expected' if summary['answers_ok'] else 'WRONG'}; total {summary['total_s']} s"
    )
    out(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
