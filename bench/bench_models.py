"""latentcast several-models benchmark: what switching models costs with one loaded at a time.

Usage::

    python bench/bench_models.py [--quick] [--models A=SPEC,B=SPEC] [--jobs N] [--steps N]
                                 [--size PX] [--device D] [--cache-dir DIR] [--cpu-threads N]

One in-process :class:`~latentcast.server.app.Server` on 127.0.0.1 (port 0) serves two
models with ``--max-resident-models 1`` (default: the built-in ``tiny`` and
``tiny-sdxl``). One client (the Python client, real WebSocket) then runs:

(a) same model   N jobs on the loaded model, one after another: submit -> complete
                 with no load (the baseline).
(b) alternating  N jobs alternating between the two models, one after another: each
                 unloads the other model and loads its own (the server's loader thread,
                 one torch thread), then runs. Per job: submit -> complete, and whether
                 its ``queued{loading:true}`` came.

From the server's record of loads and unloads (``ModelSet.history``): load seconds per
model (loading + making its engine core), unload seconds, and memory in use before and
after each unload (CUDA: torch.cuda.memory_allocated; CPU: the process's resident set,
which the allocator may not give back at once). Readable lines go to stdout; the last
line is one JSON object with every figure. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TIMEOUT = 600.0


def _mib(value: int | None) -> str:
    return "?" if value is None else f"{value / 2**20:.0f} MiB"


def _median_ms(values: list[float]) -> float:
    return round(statistics.median(values) * 1000, 1) if values else float("nan")


async def _job(client: Any, model: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    started = time.monotonic()
    job = await client.submit(
        "a lighthouse at dusk",
        model=model,
        steps=args.steps,
        width=args.size,
        height=args.size,
        seed=seed,
    )
    loading = False
    async with asyncio.timeout(TIMEOUT):
        async for event in job:
            if event.type == "queued" and event.loading:
                loading = True
    await job.result()
    return {"model": model, "seconds": time.monotonic() - started, "loading_seen": loading}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from latentcast.client import connect
    from latentcast.server.app import Server
    from latentcast.server.config import ModelSpec, ServerConfig

    models = tuple(part.strip() for part in args.models.split(",") if part.strip())
    names = [ModelSpec.parse(model).name for model in models]
    if len(names) != 2:
        raise SystemExit("--models takes exactly two models, A=SPEC,B=SPEC")
    options: dict[str, Any] = {
        "port": 0,
        "model": models,
        "max_resident_models": 1,
        "device": args.device,
        "log_level": "warning",
    }
    if args.cache_dir:
        options["cache_dir"] = Path(args.cache_dir)
    if args.cpu_threads:
        options["cpu_threads"] = args.cpu_threads
    config = ServerConfig(**options)
    figures: dict[str, Any] = {
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "models": models,
        "jobs": args.jobs,
        "steps": args.steps,
        "size": args.size,
    }
    async with Server(config) as server:
        started = time.monotonic()
        await server.wait_ready()
        print(f"server ready in {time.monotonic() - started:.1f} s (every model loaded once)")
        assert server.models is not None and server.model is not None
        figures["machine"]["device"] = str(server.model.device)
        start_events = len(server.models.history)
        async with connect(server.ws_url) as client:
            await _job(client, names[0], args, 0)  # warm-up, on the loaded model
            same = [await _job(client, names[0], args, k) for k in range(args.jobs)]
            history_from = len(server.models.history)
            alternating = [
                await _job(client, names[(k + 1) % 2], args, k) for k in range(args.jobs)
            ]
        history = list(server.models.history)
    loads = [event for event in history[history_from:] if event.kind == "load"]
    unloads = [event for event in history[history_from:] if event.kind == "unload"]
    at_start = history[:start_events]
    figures["same_model_ms_median"] = _median_ms([job["seconds"] for job in same])
    figures["alternating_ms_median"] = _median_ms([job["seconds"] for job in alternating])
    figures["loading_seen"] = sum(job["loading_seen"] for job in alternating)
    figures["loads"] = {
        name: [round(event.seconds, 3) for event in loads if event.model == name] for name in names
    }
    figures["unloads"] = [
        {
            "model": event.model,
            "seconds": round(event.seconds, 3),
            "memory_before": event.memory_before,
            "memory_after": event.memory_after,
        }
        for event in unloads
    ]
    figures["at_start"] = [
        {"kind": event.kind, "model": event.model, "seconds": round(event.seconds, 3)}
        for event in at_start
    ]
    print(f"device {figures['machine']['device']}, models {', '.join(models)}")
    print(
        f"(a) same model   {args.jobs} jobs, submit->complete median "
        f"{figures['same_model_ms_median']} ms"
    )
    print(
        f"(b) alternating  {args.jobs} jobs, submit->complete median "
        f"{figures['alternating_ms_median']} ms; queued{{loading}} seen by "
        f"{figures['loading_seen']}/{args.jobs}"
    )
    for name in names:
        seconds = figures["loads"][name]
        if seconds:
            print(
                f"    load {name}: median {statistics.median(seconds) * 1000:.0f} ms "
                f"(min {min(seconds) * 1000:.0f}, max {max(seconds) * 1000:.0f}, n={len(seconds)})"
            )
    if unloads:
        print(
            f"    unload: median {statistics.median(e.seconds for e in unloads) * 1000:.0f} ms "
            f"(n={len(unloads)})"
        )
        for event in unloads[:4]:
            print(
                f"    unload {event.model}: memory {_mib(event.memory_before)} -> "
                f"{_mib(event.memory_after)}"
            )
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 jobs of each kind")
    parser.add_argument("--models", default="sd=tiny,xl=tiny-sdxl", metavar="A=SPEC,B=SPEC")
    parser.add_argument("--jobs", type=int, default=10, metavar="N")
    parser.add_argument("--steps", type=int, default=4, metavar="N")
    parser.add_argument("--size", type=int, default=64, metavar="PX")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cache-dir", default=None, metavar="DIR")
    parser.add_argument("--cpu-threads", type=int, default=None, metavar="N")
    args = parser.parse_args(argv)
    if args.quick:
        args.jobs = 4
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    figures = asyncio.run(run(args))
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
