"""latentcast engines benchmark: engines in Ray actors, and how many sessions a front end holds.

Usage::

    python bench/bench_engines.py [--quick] [--section a|b|c] [--rounds N] [--repeats N]
                                  [--sessions N] [--cache-dir DIR]

Needs the ``latentcast[ray]`` extra for (a) and (b). Each server is an in-process
:class:`~latentcast.server.app.Server` on 127.0.0.1 (port 0) with the ``tiny`` model on
the CPU; its Ray engines run on a local Ray runtime it starts itself (``--engines N``),
each engine an actor with one CPU slot and one torch thread. The clients are real
WebSocket sessions in this process (bench/bench_server.py's client).

(a) engines      8 sessions each submit one 128x128 20-step guidance-7.5 job at once, on a
                 server with 1 Ray engine and on one with 2 (both: --max-batch 2, one
                 guided job per UNet call, so that an engine's speed is the same in
                 both). One warm-up round, then ``rounds`` rounds each; the figure is the
                 throughput ratio (median wall with 1 engine / with 2), with the rows per
                 step and the jobs each engine ran. Goal: >= 1.5 (issue 10), which needs
                 a core per engine: this machine's count is printed.
(b) cancel       one 256x256 guidance-7.5 150-step job; after step 3, a cancel at a random
                 moment within a step: cancel sent -> cancelled received, in ms and in
                 steps of the job (its median time between progress messages), through a
                 Ray engine and through the embedded engine (one torch thread each),
                 ``repeats`` each. Goal: p50 through the actor <= one step + 20 ms.
(c) sessions     ``--sessions`` (default 1000) idle sessions held open against a server
                 with the embedded engine (``--max-connections`` raised to fit), then 10
                 more sessions x 3 small jobs (64x64, 4 steps, guidance 1): the process's
                 memory (RSS) before and after connecting, per session, the time to
                 connect them, event-loop lag while the jobs run, and the jobs' latency
                 against the same jobs with no idle sessions; the full garbage
                 collections meanwhile (each stalls every session). Also the
                 file-descriptor limit (``ulimit -n``), which caps sessions per process.

Readable lines go to stdout; the last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import random
import resource
import sys
import time
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench_batching import LagProbe, rounded
from bench_server import (
    WAIT,
    BenchClient,
    JobTrace,
    cpu_model,
    finish_job,
    load_average,
    median,
    out,
    percentile,
    verdict,
)

from latentcast.server.app import Server
from latentcast.server.config import ServerConfig
from latentcast.server.models import default_cache_dir

GOAL_ENGINES_RATIO = 1.5
GOAL_CANCEL_EXTRA_MS = 20.0

HOST = "127.0.0.1"
ENGINES_JOB: dict[str, Any] = {"width": 128, "height": 128, "steps": 20, "guidance_scale": 7.5}
CANCEL_JOB: dict[str, Any] = {"width": 256, "height": 256, "steps": 150, "guidance_scale": 7.5}
SMALL_JOB: dict[str, Any] = {"width": 64, "height": 64, "steps": 4, "guidance_scale": 1.0}
READY_TIMEOUT = 300.0


def rss_mib() -> float:
    """This process's resident memory, MiB (from /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class FullCollections:
    """Durations of generation-2 garbage collections, from creation to :meth:`stop`."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.ms.append((time.perf_counter() - self._started) * 1000)

    def stop(self) -> None:
        gc.callbacks.remove(self._callback)


class EnginesBench:
    def __init__(self, cache_dir: Path, rng: random.Random) -> None:
        self.cache_dir = cache_dir
        self.rng = rng
        self.summary: dict[str, Any] = {}
        self._seed = 0

    def config(self, **options: Any) -> ServerConfig:
        settings: dict[str, Any] = {
            "host": HOST,
            "port": 0,
            "model": "tiny",
            "device": "cpu",
            "cache_dir": self.cache_dir,
            "cpu_threads": 1,
            "log_level": "warning",
            "max_queue": 256,
        }
        settings.update(options)
        return ServerConfig(**settings)

    def seed(self) -> int:
        self._seed += 1
        return self._seed

    async def started(self, config: ServerConfig) -> Server:
        server = Server(config)
        await server.start()
        async with asyncio.timeout(READY_TIMEOUT):
            await server.wait_ready()
            while len(server.workers) < max(1, config.ray_engines):  # noqa: ASYNC110 - unsignalled
                await asyncio.sleep(0.1)
        return server

    @staticmethod
    async def stopped(server: Server) -> None:
        await server.drain()
        await server.close()

    # ------------------------------------------------------------------ (a)

    async def round(self, clients: list[BenchClient], tag: str) -> tuple[float, list[JobTrace]]:
        jobs = [
            await client.submit(f"{tag}-{self.seed()}", seed=self.seed(), **ENGINES_JOB)
            for client in clients
        ]
        async with asyncio.timeout(WAIT * len(jobs)):
            for client, job in zip(clients, jobs, strict=True):
                await finish_job(client, job)
        wall = max(j.terminal_at for j in jobs) - min(j.submitted_at for j in jobs)
        return wall, jobs

    async def engines(self, rounds: int, sessions: int = 8) -> None:
        out(f"== (a) engines: {sessions} sessions x 1 job {ENGINES_JOB}, 1 Ray engine vs 2 ==")
        figures: dict[str, Any] = {"cores": os.cpu_count()}
        for count in (1, 2):
            server = await self.started(self.config(engines=count, max_batch=2))
            try:
                clients = [await BenchClient.open(server.ws_url) for _ in range(sessions)]
                warm, _ = await self.round(clients, f"w{count}")
                walls = []
                for r in range(rounds):
                    wall, _ = await self.round(clients, f"a{count}-{r}")
                    walls.append(wall)
                    out(f"  {count} engine(s)  round {r + 1}/{rounds}  {wall:7.2f} s")
                steps = Counter[str]()
                for line in server.metrics.render().decode().splitlines():
                    if line.startswith("latentcast_engine_steps_total{"):
                        steps[line.split('"')[1]] = int(float(line.split()[-1]))
                figures[str(count)] = {
                    "warmup_s": round(warm, 3),
                    "wall_s": rounded(walls),
                    "median_wall_s": round(median(walls), 3),
                    "steps_per_engine": dict(steps),
                }
                out(
                    f"  {count} engine(s)  median {median(walls):.2f} s (warm-up {warm:.2f} s), "
                    f"UNet calls per engine {dict(steps)}"
                )
                for client in clients:
                    await client.close()
            finally:
                await self.stopped(server)
        ratio = figures["1"]["median_wall_s"] / figures["2"]["median_wall_s"]
        ok = ratio >= GOAL_ENGINES_RATIO
        out(
            f"throughput ratio (1 engine / 2 engines wall) {ratio:.2f} on {os.cpu_count()} "
            f"cores   goal >= {GOAL_ENGINES_RATIO}: {verdict(ok)}"
        )
        out()
        self.summary["a"] = {**figures, "ratio": round(ratio, 4), "goal_met": ok}

    # ------------------------------------------------------------------ (b)

    async def cancel_once(self, client: BenchClient) -> dict[str, Any]:
        job = await client.submit(f"b-{self.seed()}", seed=self.seed(), **CANCEL_JOB)
        await client.wait_step(job, 3)
        step_s = median(job.step_times() or [0.1])
        await asyncio.sleep(self.rng.uniform(0.0, step_s))
        last = job.last_step
        sent_at = await client.cancel(job.id)
        await finish_job(client, job)
        if job.terminal.type != "cancelled":
            raise RuntimeError(f"the cancelled job ended with {job.terminal!r}")
        ms = (job.terminal_at - sent_at) * 1000
        return {
            "last_step": last,
            "cancelled_step": job.terminal.step,
            "step_ms": round(step_s * 1000, 2),
            "ms": round(ms, 2),
            "in_steps": round(ms / (step_s * 1000), 3),
        }

    async def cancel(self, repeats: int) -> None:
        out(f"== (b) cancel of a running job {CANCEL_JOB}: through a Ray engine vs embedded ==")
        figures: dict[str, Any] = {}
        for kind, options in (("ray", {"engines": 1}), ("embedded", {})):
            server = await self.started(self.config(**options))
            try:
                client = await BenchClient.open(server.ws_url)
                await self.cancel_once(client)  # warm-up
                samples = [await self.cancel_once(client) for _ in range(repeats)]
                await client.close()
            finally:
                await self.stopped(server)
            ms = [s["ms"] for s in samples]
            steps = [s["step_ms"] for s in samples]
            figures[kind] = {
                "samples": samples,
                "p50_ms": round(percentile(ms, 50), 2),
                "p99_ms": round(percentile(ms, 99), 2),
                "median_step_ms": round(median(steps), 2),
            }
            out(
                f"  {kind:8s}  cancel -> cancelled p50 {percentile(ms, 50):6.1f} ms  p99 "
                f"{percentile(ms, 99):6.1f} ms   step {median(steps):6.1f} ms   "
                f"({repeats} cancels)"
            )
        ray = figures["ray"]
        ok = ray["p50_ms"] <= ray["median_step_ms"] + GOAL_CANCEL_EXTRA_MS
        out(
            f"through the actor: p50 {ray['p50_ms']:.1f} ms against one step "
            f"{ray['median_step_ms']:.1f} ms + {GOAL_CANCEL_EXTRA_MS:.0f} ms: {verdict(ok)}"
        )
        out()
        self.summary["b"] = {**figures, "goal_met": ok}

    # ------------------------------------------------------------------ (c)

    async def small_load(self, url: str, sessions: int = 10, each: int = 3) -> dict[str, Any]:
        clients = [await BenchClient.open(url) for _ in range(sessions)]
        probe = LagProbe()
        jobs: list[tuple[BenchClient, JobTrace]] = []
        for client in clients:
            for _ in range(each):
                job = await client.submit(f"c-{self.seed()}", seed=self.seed(), **SMALL_JOB)
                jobs.append((client, job))
        for client, job in jobs:
            await finish_job(client, job)
        lag = await probe.stop()
        for client in clients:
            await client.close()
        latencies = [job.terminal_at - job.submitted_at for _, job in jobs]
        return {
            "jobs": len(jobs),
            "latency_p50_s": round(percentile(latencies, 50), 4),
            "latency_p99_s": round(percentile(latencies, 99), 4),
            "loop_lag_p99_ms": round(percentile(lag, 99), 2),
            "loop_lag_max_ms": round(max(lag), 2),
        }

    async def sessions(self, count: int) -> None:
        out(f"== (c) sessions: {count} idle sessions, then 10 x 3 small jobs {SMALL_JOB} ==")
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        server = await self.started(self.config(max_connections=count + 64))
        pauses = FullCollections()
        try:
            baseline = await self.small_load(server.ws_url)
            before = rss_mib()
            started = time.perf_counter()
            idle: list[BenchClient] = []
            for _ in range(count):
                idle.append(await BenchClient.open(server.ws_url))
            connect_s = time.perf_counter() - started
            after = rss_mib()
            loaded = await self.small_load(server.ws_url)
            for client in idle:
                await client.close()
        finally:
            pauses.stop()
            await self.stopped(server)
        per_session_kib = (after - before) * 1024 / count
        out(
            f"  connected {count} sessions in {connect_s:.1f} s; RSS {before:.0f} -> {after:.0f} "
            f"MiB ({per_session_kib:.0f} KiB per session, server and client sides together)"
        )
        for name, figures in (("no idle sessions", baseline), (f"{count} idle", loaded)):
            out(
                f"  {name:17s} 30 jobs: latency p50 {figures['latency_p50_s']:.3f} s p99 "
                f"{figures['latency_p99_s']:.3f} s, loop lag p99 {figures['loop_lag_p99_ms']} ms"
                f" max {figures['loop_lag_max_ms']} ms"
            )
        out(
            f"  full garbage collections (generation 2) while the section ran: "
            f"{len(pauses.ms)}, {' '.join(f'{ms:.0f}' for ms in pauses.ms)} ms (each stalls "
            "every session)"
        )
        out(f"  file descriptors: soft limit {soft}, hard limit {hard} (one per session)")
        out()
        self.summary["c"] = {
            "sessions": count,
            "connect_s": round(connect_s, 2),
            "rss_before_mib": round(before, 1),
            "rss_after_mib": round(after, 1),
            "per_session_kib": round(per_session_kib, 1),
            "baseline": baseline,
            "with_idle": loaded,
            "full_collections_ms": rounded(pauses.ms, 1),
            "nofile_soft": soft,
            "nofile_hard": hard,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Benchmark Ray engines and session capacity.")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--section", choices=["a", "b", "c"], action="append")
    parser.add_argument("--rounds", type=int, default=None, help="(a) rounds (3; quick 1)")
    parser.add_argument("--repeats", type=int, default=None, help="(b) cancels (8; quick 3)")
    parser.add_argument("--sessions", type=int, default=1000, help="(c) idle sessions")
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sections = args.section or ["a", "b", "c"]
    bench = EnginesBench(args.cache_dir or default_cache_dir(), random.Random(args.seed))
    machine = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_before": load_average(),
    }
    for name in ("torch", "ray", "websockets"):
        try:
            machine[name] = version(name)
        except Exception:  # noqa: BLE001 - not installed
            machine[name] = None
    out("latentcast engines benchmark")
    out(
        f"cpu {machine['cpu']} ({machine['cores']} cores)   python {machine['python']}   "
        f"torch {machine['torch']}   ray {machine['ray']}   load avg "
        f"{' '.join(map(str, machine['load_average_before']))} (before)"
    )
    out()
    started = time.perf_counter()
    if "a" in sections:
        await bench.engines(args.rounds or (1 if args.quick else 3))
    if "b" in sections:
        await bench.cancel(args.repeats or (3 if args.quick else 8))
    if "c" in sections:
        await bench.sessions(args.sessions)
    machine["load_average_after"] = load_average()
    bench.summary["machine"] = machine
    bench.summary["total_s"] = round(time.perf_counter() - started, 1)
    out(f"load avg {' '.join(map(str, machine['load_average_after']))} (after)")
    return bench.summary


def main(argv: list[str] | None = None) -> int:
    summary = asyncio.run(run(parse_args(argv)))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
