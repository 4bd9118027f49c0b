"""latentcast step-batching benchmark: what sharing UNet calls between jobs buys, on loopback.

Usage::

    python bench/bench_batching.py [--quick] [--section a|b|c|d|e] [--rounds N] [--repeats N]
                                   [--pairs N] [--n N] [--cache-dir DIR] [--model M] [--device D]

One in-process :class:`~latentcast.server.app.Server` on 127.0.0.1 (port 0) serves every
section; the clients are real WebSocket connections in the same process and event loop
(the client, helpers and percentiles are bench/bench_server.py's). (e) also starts
``latentcast serve`` in a child process, as a user runs it.

(a) concurrency  for N in 1, 2, 4, 8 (quick: 1, 4): N sessions each submit one 256x256
                 20-step guidance-7.5 job at once, against the same N jobs submitted one
                 after another (each after the previous one completed) to the same server.
                 One warm-up (a concurrent round), then rounds interleaved: concurrent,
                 sequential, concurrent, ... Per N: throughput ratio (sequential wall /
                 concurrent wall, median over rounds), per-job latency p50/p99 (submit ->
                 complete) of both, and rows per UNet call (the server's /metrics histogram
                 latentcast_unet_rows, sum/count before and after each phase). Also the
                 mean engine step of both (latentcast_step_seconds) and the step-time
                 ratio: seconds in steps, sequential over concurrent, which is what the
                 ratio would be if nothing but steps took time. On a CPU that is set by
                 how much cheaper a row gets in a bigger UNet call.
                 Goal: N=4 ratio >= 1.6.
(b) canvas       8 sessions x 3 jobs (64x64, 4 steps, guidance 1.0), each session
                 submitting its 3 at once, against the same 24 jobs one after another;
                 interleaved rounds as in (a). Goal: ratio >= 2.0.
(c) fan-out      100 sessions x 2 jobs (as in (b)) at once: jobs/s through the server and
                 the event-loop lag (an asyncio.sleep(0.01) probe) while they run, against
                 the engine's direct batched capacity: the same 200 jobs through a second
                 EngineCore (same model and max_batch) stepped until it is idle, on the
                 server's engine thread, without sessions or sockets; jobs join at step
                 boundaries as the server admits them (the core's BatchPolicy: at most
                 max_batch rows per UNet call). Rounds interleaved (server, direct, ...).
                 Goals: server jobs/s >= 0.8 x capacity; loop lag p99 <= 20 ms.
(d) cancel       4 sessions each run a 256x256 guidance-7.5 150-step job at once; once the
                 running ones are past step 3, one of them (at random) is cancelled at a
                 random moment within a step: cancel sent -> cancelled received, in ms and
                 in steps of that job (its median time between progress messages, i.e. one
                 batched step). Goal: p50 <= one batched step.
(e) overhead     one 256x256 20-step guidance-7.5 job with a latent preview every step
                 through ``latentcast serve`` in a child process (submit -> complete, the
                 client here) against the same job through the diffusers pipeline called
                 directly in another child (``--direct-worker``: the same model and cache,
                 torch's default thread count), interleaved after one warm-up of each; the
                 in-process server's time for the job is printed beside them (its loop
                 also runs this script's clients). The server child gets --cpu-threads
                 and --max-batch as given here (default: serve's own defaults).
                 Goal: median(server process) / median(direct) <= 1.05.

Readable lines go to stdout; the last line is one JSON object with every figure. Goals
print MET, MISSED or n/a (not measurable with this server); nothing aborts on a goal.
Every wait is bounded, so the script always stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import logging
import os
import platform
import random
import re
import signal
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from bench_server import (
    GOAL_OVERHEAD_RATIO,
    HOST,
    PROMPT,
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
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from latentcast.protocol import PreviewRequest
from latentcast.server.app import Server
from latentcast.server.config import ServerConfig
from latentcast.server.jobs import GenerationRequest
from latentcast.server.models import default_cache_dir, load_model

GOAL_CONCURRENCY_N = 4
GOAL_CONCURRENCY_RATIO = 1.6
GOAL_CANVAS_RATIO = 2.0
GOAL_CAPACITY_SHARE = 0.8
GOAL_LOOP_LAG_P99_MS = 20.0
GOAL_CANCEL_STEPS = 1.0

SCHEDULER = "euler"
STEP_SECONDS = "latentcast_step_seconds"
SEED = 1234
#: (a) and (e): a job the size of a real preview-quality request on this model.
BIG_JOB: dict[str, Any] = {"width": 256, "height": 256, "steps": 20, "guidance_scale": 7.5}
#: (b) and (c): a canvas stroke: small, few steps, no classifier-free guidance.
SMALL_JOB: dict[str, Any] = {"width": 64, "height": 64, "steps": 4, "guidance_scale": 1.0}
#: (d): runs until cancelled (150 steps is the default max_steps).
LONG_JOB: dict[str, Any] = {"width": 256, "height": 256, "steps": 150, "guidance_scale": 7.5}
#: Lines of the direct worker's stdout that carry its answers start with this.
WORKER_TAG = "DIRECT "
SCRIPT = str(Path(__file__).resolve())
SECTION_TIMEOUT = 1800.0
LOAD_TIMEOUT = 600.0
#: Added to WAIT per job for jobs that were submitted together.
PER_JOB_WAIT = 5.0


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def goal_text(ok: bool | None) -> str:
    return "n/a" if ok is None else verdict(ok)


def rounded(values: list[float], digits: int = 4) -> list[float]:
    return [round(v, digits) for v in values]


def image_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()[:16]


def rows_per_call(
    before: tuple[float, float] | None, after: tuple[float, float] | None
) -> float | None:
    """Mean of latentcast_unet_rows between two (sum, count) readings; None without it."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


class LagProbe:
    """The event loop's lateness: a task sleeping 10 ms in a loop, lag = actual - 10 ms."""

    INTERVAL = 0.01

    def __init__(self) -> None:
        self.samples_ms: list[float] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(self.INTERVAL)
            self.samples_ms.append(max(0.0, time.perf_counter() - before - self.INTERVAL) * 1000)

    async def stop(self) -> list[float]:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.samples_ms


@dataclass
class Phase:
    """One batch of jobs submitted concurrently or one after another."""

    wall_s: float
    latencies_s: list[float]
    rows: tuple[float, float] | None  # change of latentcast_unet_rows (sum, count)
    steps: tuple[float, float] | None  # change of latentcast_step_seconds (sum, count)


@dataclass
class Comparison:
    concurrent: list[Phase] = field(default_factory=list)
    sequential: list[Phase] = field(default_factory=list)

    @property
    def ratios(self) -> list[float]:
        return [s.wall_s / c.wall_s for c, s in zip(self.concurrent, self.sequential, strict=True)]

    @staticmethod
    def rows(phases: list[Phase]) -> float | None:
        readings = [p.rows for p in phases if p.rows is not None]
        if not readings or len(readings) < len(phases):
            return None
        total = sum(r[0] for r in readings), sum(r[1] for r in readings)
        return rows_per_call((0.0, 0.0), total)

    @staticmethod
    def step_seconds(phases: list[Phase]) -> tuple[float, float] | None:
        """(seconds in engine steps, steps) over ``phases``; None without the metric."""
        readings = [p.steps for p in phases if p.steps is not None]
        if not readings or len(readings) < len(phases):
            return None
        return sum(r[0] for r in readings), sum(r[1] for r in readings)

    @property
    def step_time_ratio(self) -> float | None:
        """Seconds in engine steps, sequential over concurrent: what the ratio would be if
        nothing but steps took time (its ceiling, give or take the jobs' other work)."""
        conc, seq = self.step_seconds(self.concurrent), self.step_seconds(self.sequential)
        if conc is None or seq is None or conc[0] <= 0:
            return None
        return seq[0] / conc[0]

    def summary(self) -> dict[str, Any]:
        figures: dict[str, Any] = {"ratio": round(median(self.ratios), 4)}
        figures["ratios"] = rounded(self.ratios)
        step_ratio = self.step_time_ratio
        figures["step_time_ratio"] = None if step_ratio is None else round(step_ratio, 4)
        for name, phases in (("concurrent", self.concurrent), ("sequential", self.sequential)):
            latencies = [x for p in phases for x in p.latencies_s]
            rows = self.rows(phases)
            steps = self.step_seconds(phases)
            figures[name] = {
                "wall_s": rounded([p.wall_s for p in phases]),
                "latency_p50_s": round(percentile(latencies, 50), 4),
                "latency_p99_s": round(percentile(latencies, 99), 4),
                "rows_per_unet_call": None if rows is None else round(rows, 3),
                "step_ms": round(1000 * steps[0] / steps[1], 2) if steps and steps[1] else None,
            }
        return figures


# --------------------------------------------------------------------------- the sections


@dataclass
class BatchBench:
    server: Server
    rng: random.Random
    summary: dict[str, Any]
    seeds: int = 0

    @property
    def url(self) -> str:
        return self.server.ws_url

    def next_seed(self) -> int:
        self.seeds += 1
        return self.seeds

    async def open_clients(self, count: int) -> list[BenchClient]:
        return list(await asyncio.gather(*(BenchClient.open(self.url) for _ in range(count))))

    @staticmethod
    async def close_clients(clients: list[BenchClient]) -> None:
        await asyncio.gather(*(client.close() for client in clients))

    async def unet_rows(self) -> tuple[float, float] | None:
        """(sum, count) of latentcast_unet_rows from GET /metrics; None when it is absent."""
        return await self.histogram("latentcast_unet_rows")

    async def histogram(self, name: str) -> tuple[float, float] | None:
        """(sum, count) of histogram ``name`` from GET /metrics; None when it is absent."""

        def fetch() -> str:
            with urllib.request.urlopen(f"{self.server.http_url}/metrics", timeout=WAIT) as r:
                return str(r.read().decode())

        text = await asyncio.to_thread(fetch)
        for family in text_string_to_metric_families(text):
            if family.name == name:
                sums = [s.value for s in family.samples if s.name.endswith("_sum")]
                counts = [s.value for s in family.samples if s.name.endswith("_count")]
                return sum(sums), sum(counts)
        return None

    async def submit(self, client: BenchClient, tag: str, params: dict[str, Any]) -> JobTrace:
        seed = self.next_seed()
        return await client.submit(f"{tag}-{seed}", scheduler=SCHEDULER, seed=seed, **params)

    @staticmethod
    async def completed(client: BenchClient, job: JobTrace, within: float = WAIT) -> JobTrace:
        await client.wait(job.ended, within)
        if job.terminal is None or job.terminal.type != "complete":
            raise RuntimeError(f"job {job.id} ended with {job.terminal!r}")
        return job

    async def phase(
        self, clients: list[BenchClient], each: int, params: dict[str, Any], concurrent: bool
    ) -> Phase:
        before = await self.unet_rows()
        steps_before = await self.histogram(STEP_SECONDS)
        tag = "c" if concurrent else "s"
        if concurrent:
            traces = await asyncio.gather(
                *(self.submit(c, tag, params) for c in clients for _ in range(each))
            )
            owners = [c for c in clients for _ in range(each)]
            # Many jobs at once: the last may wait for all the others.
            within = WAIT + PER_JOB_WAIT * len(traces)
            jobs = await asyncio.gather(
                *(self.completed(c, j, within) for c, j in zip(owners, traces, strict=True))
            )
        else:
            jobs = []
            for client in clients:
                for _ in range(each):
                    jobs.append(
                        await self.completed(client, await self.submit(client, tag, params))
                    )
        after = await self.unet_rows()
        steps_after = await self.histogram(STEP_SECONDS)
        wall = max(j.terminal_at for j in jobs) - min(j.submitted_at for j in jobs)
        delta = (
            None
            if before is None or after is None
            else (after[0] - before[0], after[1] - before[1])
        )
        steps = (
            None
            if steps_before is None or steps_after is None
            else (steps_after[0] - steps_before[0], steps_after[1] - steps_before[1])
        )
        return Phase(wall, [j.terminal_at - j.submitted_at for j in jobs], delta, steps)

    async def compare(
        self, clients: list[BenchClient], each: int, params: dict[str, Any], rounds: int
    ) -> Comparison:
        """One concurrent warm-up, then concurrent and sequential rounds interleaved."""
        warm = await self.phase(clients, each, params, concurrent=True)
        out(f"  warm-up (concurrent)  {warm.wall_s:7.2f} s")
        result = Comparison()
        for r in range(rounds):
            conc = await self.phase(clients, each, params, concurrent=True)
            seq = await self.phase(clients, each, params, concurrent=False)
            result.concurrent.append(conc)
            result.sequential.append(seq)
            out(
                f"  round {r + 1}/{rounds}  concurrent {conc.wall_s:7.2f} s   "
                f"sequential {seq.wall_s:7.2f} s   ratio {seq.wall_s / conc.wall_s:5.2f}   "
                f"rows/UNet call {fmt(rows_per_call((0, 0), conc.rows))} "
                f"(sequential {fmt(rows_per_call((0, 0), seq.rows))})"
            )
        return result

    @staticmethod
    def describe(name: str, comparison: Comparison) -> dict[str, Any]:
        figures = comparison.summary()
        conc, seq = figures["concurrent"], figures["sequential"]
        out(
            f"{name}: ratio {figures['ratio']:.2f}   latency concurrent p50 "
            f"{conc['latency_p50_s']:.2f} s p99 {conc['latency_p99_s']:.2f} s, sequential p50 "
            f"{seq['latency_p50_s']:.2f} s p99 {seq['latency_p99_s']:.2f} s   rows/UNet call "
            f"{fmt(conc['rows_per_unet_call'])} (sequential {fmt(seq['rows_per_unet_call'])})"
        )
        out(
            f"{' ' * len(name)}  engine step {fmt(conc['step_ms'], '.1f')} ms concurrent, "
            f"{fmt(seq['step_ms'], '.1f')} ms sequential: step-time ratio "
            f"{fmt(figures['step_time_ratio'])} (the ratio if only steps took time)"
        )
        return figures

    # ---------------------------------------------------------------- (a) concurrency

    async def concurrency(self, counts: list[int], rounds: int) -> None:
        out(f"== (a) concurrency: N sessions x 1 job {BIG_JOB}, concurrent vs sequential ==")
        per_n: dict[str, Any] = {}
        for n in counts:
            out(f"N={n}")
            clients = await self.open_clients(n)
            try:
                comparison = await self.compare(clients, 1, BIG_JOB, rounds)
            finally:
                await self.close_clients(clients)
            per_n[str(n)] = self.describe(f"N={n}", comparison)
        goal = per_n.get(str(GOAL_CONCURRENCY_N))
        ok = None if goal is None else goal["ratio"] >= GOAL_CONCURRENCY_RATIO
        out(f"goal N={GOAL_CONCURRENCY_N} ratio >= {GOAL_CONCURRENCY_RATIO}: {goal_text(ok)}")
        out()
        self.summary["a"] = {
            "job": BIG_JOB,
            "rounds": rounds,
            "per_n": per_n,
            "goal_ratio": GOAL_CONCURRENCY_RATIO,
            "goal_met": ok,
        }

    # ---------------------------------------------------------------- (b) canvas

    async def canvas(self, rounds: int, sessions: int = 8, each: int = 3) -> None:
        out(f"== (b) canvas: {sessions} sessions x {each} jobs {SMALL_JOB} ==")
        clients = await self.open_clients(sessions)
        try:
            comparison = await self.compare(clients, each, SMALL_JOB, rounds)
        finally:
            await self.close_clients(clients)
        figures = self.describe("canvas", comparison)
        ok = figures["ratio"] >= GOAL_CANVAS_RATIO
        out(f"goal ratio >= {GOAL_CANVAS_RATIO}: {verdict(ok)}")
        out()
        self.summary["b"] = {
            "job": SMALL_JOB,
            "sessions": sessions,
            "jobs_per_session": each,
            "rounds": rounds,
            **figures,
            "goal_ratio": GOAL_CANVAS_RATIO,
            "goal_met": ok,
        }

    # ---------------------------------------------------------------- (c) fan-out

    async def through_server(self, clients: list[BenchClient], each: int) -> dict[str, Any]:
        probe = LagProbe()
        try:
            phase = await self.phase(clients, each, SMALL_JOB, concurrent=True)
        finally:
            lags = await probe.stop()
        jobs = len(clients) * each
        return {
            "wall_s": phase.wall_s,
            "jobs_per_s": jobs / phase.wall_s,
            "lags_ms": lags,
            "rows": rows_per_call((0, 0), phase.rows),
        }

    async def capacity(self, core: Any, jobs: int) -> dict[str, Any]:
        """The same jobs through the EngineCore on the engine thread: no sessions, no sockets."""
        requests = [
            GenerationRequest(
                prompt=PROMPT,
                negative_prompt="",
                width=SMALL_JOB["width"],
                height=SMALL_JOB["height"],
                steps=SMALL_JOB["steps"],
                guidance_scale=SMALL_JOB["guidance_scale"],
                seed=self.next_seed(),
                scheduler=SCHEDULER,
                num_images=1,
            )
            for _ in range(jobs)
        ]
        return await self.server.engine_thread.call(drive_core, core, requests)

    async def fan_out(self, rounds: int, sessions: int = 100, each: int = 2) -> None:
        out(f"== (c) fan-out: {sessions} sessions x {each} jobs {SMALL_JOB}, vs the engine core ==")
        core, why = await self.make_core()
        if core is None:
            out(f"engine core not available ({why}): capacity n/a")
        clients = await self.open_clients(sessions)
        served: list[dict[str, Any]] = []
        direct: list[dict[str, Any]] = []
        try:
            # Warm-up: a few sessions through the server, a batch through the core.
            warm = await self.through_server(clients[:8], 1)
            out(f"warm-up      server {warm['wall_s']:.2f} s (8 jobs)")
            if core is not None:
                warm_core = await self.capacity(core, 16)
                out(f"warm-up      core   {warm_core['wall_s']:.2f} s (16 jobs)")
            for r in range(rounds):
                s = await self.through_server(clients, each)
                served.append(s)
                line = (
                    f"round {r + 1}/{rounds}  server {s['jobs_per_s']:6.1f} jobs/s "
                    f"({s['wall_s']:.2f} s, rows/UNet call {fmt(s['rows'])}, loop lag p99 "
                    f"{percentile(s['lags_ms'], 99):.1f} ms)"
                )
                if core is not None:
                    d = await self.capacity(core, sessions * each)
                    direct.append(d)
                    line += (
                        f"   core {d['jobs_per_s']:6.1f} jobs/s ({d['wall_s']:.2f} s, "
                        f"rows/UNet call {fmt(d['rows'])}, {d['finished']} finished)"
                    )
                out(line)
        finally:
            await self.close_clients(clients)
        lags = [x for s in served for x in s["lags_ms"]]
        server_rate = median([s["jobs_per_s"] for s in served])
        capacity = median([d["jobs_per_s"] for d in direct]) if direct else None
        share = None if capacity is None else server_rate / capacity
        lag_p99 = percentile(lags, 99)
        ok_share = None if share is None else share >= GOAL_CAPACITY_SHARE
        ok_lag = lag_p99 <= GOAL_LOOP_LAG_P99_MS
        out(
            f"server {server_rate:.1f} jobs/s, engine core capacity {fmt(capacity, '.1f')} jobs/s, "
            f"share {fmt(share, '.3f')}"
        )
        out(
            f"event-loop lag ({len(lags)} samples) p50 {percentile(lags, 50):.1f} ms  "
            f"p99 {lag_p99:.1f} ms  max {max(lags, default=float('nan')):.1f} ms"
        )
        out(f"goal server >= {GOAL_CAPACITY_SHARE} x capacity: {goal_text(ok_share)}")
        out(f"goal loop lag p99 <= {GOAL_LOOP_LAG_P99_MS:.0f} ms: {verdict(ok_lag)}")
        out()
        self.summary["c"] = {
            "job": SMALL_JOB,
            "sessions": sessions,
            "jobs_per_session": each,
            "rounds": rounds,
            "core_unavailable": why,
            "server_jobs_per_s": rounded([s["jobs_per_s"] for s in served], 2),
            "server_wall_s": rounded([s["wall_s"] for s in served]),
            "server_rows_per_unet_call": [s["rows"] for s in served],
            "core_jobs_per_s": rounded([d["jobs_per_s"] for d in direct], 2),
            "core_wall_s": rounded([d["wall_s"] for d in direct]),
            "core_rows_per_unet_call": [d["rows"] for d in direct],
            "core_max_batch": getattr(getattr(core, "policy", None), "max_batch", None),
            "median_server_jobs_per_s": round(server_rate, 2),
            "median_capacity_jobs_per_s": None if capacity is None else round(capacity, 2),
            "share": None if share is None else round(share, 4),
            "loop_lag_p50_ms": round(percentile(lags, 50), 2),
            "loop_lag_p99_ms": round(lag_p99, 2),
            "loop_lag_max_ms": round(max(lags, default=float("nan")), 2),
            "goal_share": GOAL_CAPACITY_SHARE,
            "goal_loop_lag_p99_ms": GOAL_LOOP_LAG_P99_MS,
            "goal_share_met": ok_share,
            "goal_loop_lag_met": ok_lag,
            "goal_met": None if ok_share is None else ok_share and ok_lag,
        }

    async def make_core(self) -> tuple[Any, str | None]:
        """A second EngineCore on the server's model, sized like the server's; or why not."""
        try:
            from latentcast.server.engine import EngineCore, default_max_batch
        except ImportError as exc:
            return None, str(exc)
        model = self.server.model
        assert model is not None
        max_batch = self.server.config.max_batch or default_max_batch(model.device.type)
        return await self.server.engine_thread.call(
            lambda: EngineCore(model, max_batch=max_batch)
        ), None

    # ---------------------------------------------------------------- (d) cancel

    async def cancel_in_batch(self, repeats: int, sessions: int = 4) -> None:
        out(f"== (d) cancel one of {sessions} running jobs {LONG_JOB} ==")
        clients = await self.open_clients(sessions)
        samples: list[dict[str, Any]] = []
        try:
            for i in range(repeats + 1):  # the first is a warm-up
                sample = await self.cancel_once(clients)
                label = "warm-up" if i == 0 else f"run {i:2d}/{repeats}"
                out(
                    f"{label}  {sample['running']}/{sessions} running, cancel after step "
                    f"{sample['last_step']:3d} -> cancelled at {sample['cancelled_step']:3d}  "
                    f"{sample['ms']:7.1f} ms = {sample['in_steps']:.2f} steps of "
                    f"{sample['step_ms']:.1f} ms"
                )
                if i > 0:
                    samples.append(sample)
        finally:
            await self.close_clients(clients)
        ms = [s["ms"] for s in samples]
        in_steps = [s["in_steps"] for s in samples]
        step_ms = median([s["step_ms"] for s in samples])
        p50_steps = percentile(in_steps, 50)
        ok = p50_steps <= GOAL_CANCEL_STEPS
        out(f"median batched step (progress messages of the cancelled jobs): {step_ms:.1f} ms")
        out(
            f"cancel -> cancelled  p50 {percentile(ms, 50):.1f} ms  p99 {percentile(ms, 99):.1f} "
            f"ms  max {max(ms):.1f} ms"
        )
        out(
            f"in steps             p50 {p50_steps:.2f}  p99 {percentile(in_steps, 99):.2f}  "
            f"max {max(in_steps):.2f}   (jobs running at the cancel: median "
            f"{median([s['running'] for s in samples])} of {sessions})"
        )
        out(f"goal p50 <= one batched step: {verdict(ok)}")
        out()
        self.summary["d"] = {
            "job": LONG_JOB,
            "sessions": sessions,
            "repeats": repeats,
            "samples": samples,
            "median_step_ms": round(step_ms, 2),
            "p50_ms": round(percentile(ms, 50), 2),
            "p99_ms": round(percentile(ms, 99), 2),
            "max_ms": round(max(ms), 2),
            "p50_steps": round(p50_steps, 3),
            "p99_steps": round(percentile(in_steps, 99), 3),
            "goal_steps": GOAL_CANCEL_STEPS,
            "goal_met": ok,
        }

    async def cancel_once(self, clients: list[BenchClient]) -> dict[str, Any]:
        jobs = await asyncio.gather(*(self.submit(c, "d", LONG_JOB) for c in clients))
        pairs = list(zip(clients, jobs, strict=True))
        try:
            # Until one job is past step 3; then give the others three of its steps to get
            # there too (they do at once when batched; a one-at-a-time engine queues them).
            waiters = [asyncio.create_task(c.wait_step(j, 3)) for c, j in pairs]
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED, timeout=WAIT)
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
            first = max(jobs, key=lambda j: j.last_step)
            grace = min(5.0, max(0.3, 3 * median(first.step_times() or [0.1])))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await asyncio.gather(*(c.wait_step(j, 3) for c, j in pairs))
            running = [(c, j) for c, j in pairs if j.last_step >= 3 and j.terminal is None]
            if not running:
                raise RuntimeError(f"no job reached step 3 within {WAIT:.0f} s")
            client, job = self.rng.choice(running)
            await asyncio.sleep(self.rng.uniform(0.0, median(job.step_times() or [0.1])))
            last_step = job.last_step
            step_ms = median(job.step_times() or [float("nan")]) * 1000
            sent_at = await client.cancel(job.id)
            await finish_job(client, job)
            if job.terminal.type != "cancelled":
                raise RuntimeError(f"cancelled job ended with {job.terminal!r}")
            ms = (job.terminal_at - sent_at) * 1000
            return {
                "running": len(running),
                "last_step": last_step,
                "cancelled_step": job.terminal.step,
                "step_ms": round(step_ms, 2),
                "ms": round(ms, 2),
                "in_steps": round(ms / step_ms, 3),
                "step_delta": job.terminal.step - last_step,
            }
        finally:
            for c, j in pairs:  # the rest: end them, so the next repeat starts on an idle engine
                if j.terminal is None:
                    await c.cancel(j.id)
            for c, j in pairs:
                await finish_job(c, j)

    # ---------------------------------------------------------------- (e) overhead

    async def overhead(self, pairs: int, worker_args: list[str], serve_args: list[str]) -> None:
        out("== (e) overhead: a server process vs the pipeline called directly in another ==")
        preview = PreviewRequest(kind="latent", every=1)
        params = {**BIG_JOB, "seed": SEED, "negative_prompt": ""}
        served_in_process = await self.server.engine_thread.call(torch.get_num_threads)
        worker = await DirectWorker.start(worker_args)
        child = await ServeProcess.start(serve_args)
        clients: list[BenchClient] = []
        try:
            process_client = await BenchClient.open(child.url)
            local_client = await BenchClient.open(self.url)
            clients += [process_client, local_client]

            async def served(client: BenchClient) -> tuple[float, JobTrace]:
                job = await client.submit(
                    f"e-{self.next_seed()}", preview=preview, scheduler=SCHEDULER, **params
                )
                await self.completed(client, job)
                return job.terminal_at - job.submitted_at, job

            warm_s, warm_job = await served(process_client)
            warm_local_s, _ = await served(local_client)
            served_image = Image.open(io.BytesIO(warm_job.terminal.images[0].data))
            same = image_digest(served_image) == worker.ready["digest"]
            out(
                f"warm-up      server process {warm_s:6.3f} s   direct "
                f"{worker.ready['warmup_s']:6.3f} s   in-process server {warm_local_s:6.3f} s"
                f"   same image from the server and the pipeline: {'yes' if same else 'no'}"
            )
            out(
                f"torch threads: direct worker {worker.ready['threads']} (torch's default "
                f"there), server process {child.engine_threads or '?'} (its log), in-process "
                f"server {served_in_process}"
            )
            server_s: list[float] = []
            direct_s: list[float] = []
            local_s: list[float] = []
            for i in range(pairs):
                s, job = await served(process_client)
                d = (await worker.run())["s"]
                local, _ = await served(local_client)
                server_s.append(s)
                direct_s.append(d)
                local_s.append(local)
                out(
                    f"pair {i + 1}/{pairs}   server process {s:6.3f} s   direct {d:6.3f} s   "
                    f"ratio {s / d:5.3f}   (in-process server {local:6.3f} s; {len(job.progress)} "
                    f"progress, {job.previews} previews)"
                )
        finally:
            await self.close_clients(clients)
            await child.stop()
            await worker.stop()
        ratio = median(server_s) / median(direct_s)
        ok = ratio <= GOAL_OVERHEAD_RATIO
        out(
            f"median server process {median(server_s):.3f} s, median direct "
            f"{median(direct_s):.3f} s (in-process server {median(local_s):.3f} s, "
            f"{median(local_s) / median(direct_s):.3f}x)"
        )
        out(
            f"ratio median(server)/median(direct) = {ratio:.3f}   goal <= {GOAL_OVERHEAD_RATIO}: "
            f"{verdict(ok)}"
        )
        out()
        self.summary["e"] = {
            "job": {**BIG_JOB, "preview": "latent every 1"},
            "pairs": pairs,
            "server_threads": child.engine_threads,
            "direct_threads": worker.ready["threads"],
            "in_process_threads": served_in_process,
            "server_s": rounded(server_s),
            "direct_s": rounded(direct_s),
            "in_process_s": rounded(local_s),
            "median_server_s": round(median(server_s), 4),
            "median_direct_s": round(median(direct_s), 4),
            "median_in_process_s": round(median(local_s), 4),
            "same_image": same,
            "ratio": round(ratio, 4),
            "in_process_ratio": round(median(local_s) / median(direct_s), 4),
            "goal_ratio": GOAL_OVERHEAD_RATIO,
            "goal_met": ok,
        }


def drive_core(core: Any, requests: list[GenerationRequest]) -> dict[str, Any]:
    """On the engine thread: every request through ``core``, stepped until it is idle.

    Jobs join at step boundaries as the server's EngineWorker admits them: in order, while
    the core's BatchPolicy (max_batch rows per UNet call) lets them; the core itself does
    not hold jobs back. Bounded by a step count and by time.
    """
    from latentcast.server.engine import JobSpec, group_key
    from latentcast.server.engine.prepare import job_rows

    model = core.model
    policy = core.policy
    started = time.perf_counter()
    pending = list(enumerate(requests))
    running: dict[int, tuple[Any, int]] = {}  # key -> (group, rows)
    finished = failed = 0
    rows: list[int] = []

    def dispatch(events: list[Any]) -> None:
        nonlocal finished, failed
        for event in events:
            name = type(event).__name__
            finished += name == "JobFinished"
            failed += name == "JobFailed"
            if name in ("JobFinished", "JobFailed", "JobStopped"):
                running.pop(event.key, None)

    limit = sum(r.steps + 1 for r in requests) + 10
    for _ in range(limit):
        groups: Counter[Any] = Counter()
        for group, n in running.values():
            groups[group] += n
        while pending:
            key, request = pending[0]
            group, n = group_key(model, request), job_rows(model, request)
            if not policy.admits(groups, group, n):
                break
            pending.pop(0)
            groups[group] += n
            running[key] = (group, n)
            dispatch(core.add(JobSpec(key=key, request=request)))
        if not core.busy or time.perf_counter() - started > WAIT + PER_JOB_WAIT * len(requests):
            break
        report = core.step()
        dispatch(list(getattr(report, "events", report)))  # a StepReport, or a plain list
        rows.extend(getattr(report, "unet_rows", ()))
    if core.busy or pending:
        raise RuntimeError(f"the engine core was not done after {limit} steps")
    wall = time.perf_counter() - started
    return {
        "wall_s": wall,
        "jobs_per_s": len(requests) / wall,
        "finished": finished,
        "failed": failed,
        "rows": sum(rows) / len(rows) if rows else None,
    }


# --------------------------------------------------------------------------- direct worker


def direct_call(model: Any, seed: int) -> tuple[float, Image.Image]:
    """The (e) job through the diffusers pipeline: a fresh euler scheduler, then one call."""
    started = time.perf_counter()
    pipeline = model.pipeline
    pipeline.scheduler = model.make_scheduler(SCHEDULER)
    result = pipeline(
        prompt=PROMPT,
        negative_prompt="",
        num_inference_steps=BIG_JOB["steps"],
        guidance_scale=BIG_JOB["guidance_scale"],
        width=BIG_JOB["width"],
        height=BIG_JOB["height"],
        generator=[torch.Generator("cpu").manual_seed(seed)],
        output_type="pil",
    )
    return time.perf_counter() - started, result.images[0]


def direct_worker(args: argparse.Namespace) -> int:
    """``--direct-worker``: load the model, warm up, then one call per ``run`` line on stdin.

    Never sets torch's thread count: the direct side runs as a plain script would.
    """

    def reply(message: dict[str, Any]) -> None:
        print(WORKER_TAG + json.dumps(message), flush=True)

    model = load_model(args.model, device=args.device, cache_dir=args.cache_dir)
    warm_s, image = direct_call(model, SEED)
    reply(
        {
            "threads": torch.get_num_threads(),
            "warmup_s": warm_s,
            "digest": image_digest(image),
            "device": str(model.device),
        }
    )
    for line in sys.stdin:
        if line.strip() != "run":
            break
        seconds, image = direct_call(model, SEED)
        reply({"s": seconds, "digest": image_digest(image)})
    return 0


@dataclass
class DirectWorker:
    """The parent's handle on a ``--direct-worker`` subprocess."""

    process: asyncio.subprocess.Process
    ready: dict[str, Any] = field(default_factory=dict)

    @classmethod
    async def start(cls, worker_args: list[str]) -> DirectWorker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            SCRIPT,
            "--direct-worker",
            *worker_args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        worker = cls(process)
        try:
            worker.ready = await worker.answer(within=600.0)
        except BaseException:
            await worker.stop()
            raise
        return worker

    async def answer(self, within: float = WAIT) -> dict[str, Any]:
        assert self.process.stdout is not None
        async with asyncio.timeout(within):
            while line := (await self.process.stdout.readline()).decode():
                if line.startswith(WORKER_TAG):
                    answer: dict[str, Any] = json.loads(line[len(WORKER_TAG) :])
                    return answer
        raise RuntimeError(f"the direct worker ended (status {await self.process.wait()})")

    async def run(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(b"run\n")
        await self.process.stdin.drain()
        return await self.answer()

    async def stop(self) -> None:
        if self.process.returncode is not None:
            return
        with contextlib.suppress(Exception):
            assert self.process.stdin is not None
            self.process.stdin.write(b"quit\n")
            self.process.stdin.close()
        try:
            async with asyncio.timeout(10):
                await self.process.wait()
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


@dataclass
class ServeProcess:
    """``latentcast serve --port 0`` in a child process, as a user runs it: listening, ready."""

    process: asyncio.subprocess.Process
    url: str = ""
    engine_threads: int | None = None
    _reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, serve_args: list[str]) -> ServeProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "latentcast.server.cli",
            "serve",
            "--port",
            "0",
            *serve_args,
            stderr=asyncio.subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        child = cls(process)
        listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def read_log() -> None:
            assert process.stderr is not None
            while line := (await process.stderr.readline()).decode():
                if match := re.search(r"listening on (ws://\S+)", line):
                    if not listening.done():
                        listening.set_result(match.group(1))
                if match := re.search(r"engine uses (\d+) CPU threads", line):
                    child.engine_threads = int(match.group(1))
            if not listening.done():
                listening.set_exception(RuntimeError("latentcast serve ended before listening"))

        child._reader = asyncio.create_task(read_log())
        try:
            async with asyncio.timeout(LOAD_TIMEOUT):
                child.url = await listening
                http_url = child.url.replace("ws://", "http://").removesuffix("/v1/ws")
                while await asyncio.to_thread(http_status, f"{http_url}/ready") != 200:
                    if process.returncode is not None:
                        raise RuntimeError("latentcast serve ended while loading")
                    await asyncio.sleep(0.1)
        except BaseException:
            await child.stop()
            raise
        return child

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(30):
                    await self.process.wait()
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._reader is not None:
            await self._reader


def http_status(url: str) -> int:
    """The status of GET ``url`` (an HTTP error's too)."""
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark step batching on loopback (see the module docstring)."
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~3 min)")
    parser.add_argument(
        "--section",
        choices=["a", "b", "c", "d", "e"],
        action="append",
        help="run only this section (repeatable); default: all",
    )
    parser.add_argument(
        "--cache-dir", type=Path, help=f"the model cache (default {default_cache_dir()})"
    )
    parser.add_argument("--model", default="tiny", help="model spec, as for latentcast serve")
    parser.add_argument("--device", default="auto", help="device, as for latentcast serve")
    parser.add_argument(
        "--cpu-threads", type=int, default=None, help="the engine's torch threads (serve's)"
    )
    parser.add_argument(
        "--max-batch", type=int, default=None, help="rows per UNet call (serve's default)"
    )
    parser.add_argument(
        "--rounds", type=int, default=None, help="(a, b, c) interleaved rounds (3; quick 1)"
    )
    parser.add_argument(
        "--n",
        type=int,
        action="append",
        help="(a) session counts, repeatable (1 2 4 8; quick 1 4)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="(d) cancels (8; quick 3)")
    parser.add_argument("--pairs", type=int, default=None, help="(e) pairs (9; quick 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random cancel choices")
    parser.add_argument("--direct-worker", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def machine_facts() -> dict[str, Any]:
    facts: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
    }
    facts.update({name: version(name) for name in ("torch", "diffusers", "websockets")})
    facts["torch_threads_main"] = torch.get_num_threads()
    facts["load_average_before"] = load_average()
    return facts


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sections = args.section or ["a", "b", "c", "d", "e"]
    quick = args.quick
    rounds = args.rounds or (1 if quick else 3)
    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    machine = machine_facts()
    summary: dict[str, Any] = {"quick": quick, "sections": sections, "machine": machine}
    out("latentcast step-batching benchmark")
    out(
        f"cpu {machine['cpu']} ({machine['cores']} cores)   python {machine['python']}   "
        f"torch {machine['torch']}   diffusers {machine['diffusers']}   "
        f"load avg {' '.join(map(str, machine['load_average_before']))} (before)"
    )
    # 200 jobs at once in (c): the queue must hold them all.
    config = ServerConfig(
        host=HOST,
        port=0,
        max_queue=256,
        log_level="warning",
        model=args.model,
        device=args.device,
        cache_dir=cache_dir,
        cpu_threads=args.cpu_threads,
        max_batch=args.max_batch,
    )
    async with Server(config) as server:
        async with asyncio.timeout(LOAD_TIMEOUT):
            await server.wait_ready()
        assert server.model is not None
        machine["device"] = str(server.model.device)
        machine["model"] = server.model.name
        machine["engine_threads"] = await server.engine_thread.call(torch.get_num_threads)
        machine["max_batch"] = server.config.max_batch
        with contextlib.suppress(ImportError):
            from latentcast.server.engine import default_max_batch

            machine["max_batch"] = machine["max_batch"] or default_max_batch(
                server.model.device.type
            )
        out(
            f"server   model {machine['model']} on {machine['device']}, engine thread "
            f"{machine['engine_threads']} torch threads, max_batch {machine['max_batch']}"
        )
        out(f"mode     {'quick' if quick else 'full'}, sections {' '.join(sections)}")
        out()
        bench = BatchBench(server, random.Random(args.seed), summary)
        worker_args = [
            "--model",
            args.model,
            "--device",
            args.device,
            "--cache-dir",
            str(cache_dir),
        ]
        serve_args = [*worker_args, "--log-level", "info"]
        if args.cpu_threads is not None:
            serve_args += ["--cpu-threads", str(args.cpu_threads)]
        if args.max_batch is not None:
            serve_args += ["--max-batch", str(args.max_batch)]
        counts = args.n or ([1, 4] if quick else [1, 2, 4, 8])
        steps: dict[str, Callable[[], Awaitable[None]]] = {
            "a": lambda: bench.concurrency(counts, rounds),
            "b": lambda: bench.canvas(rounds),
            "c": lambda: bench.fan_out(rounds),
            "d": lambda: bench.cancel_in_batch(args.repeats or (3 if quick else 8)),
            "e": lambda: bench.overhead(args.pairs or (3 if quick else 9), worker_args, serve_args),
        }
        for section in sections:
            started = time.perf_counter()
            async with asyncio.timeout(SECTION_TIMEOUT):
                await steps[section]()
            summary.setdefault("section_s", {})[section] = round(time.perf_counter() - started, 1)
    machine["load_average_after"] = load_average()
    out(f"load avg {' '.join(map(str, machine['load_average_after']))} (after)")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.direct_worker:
        return direct_worker(args)
    began = time.perf_counter()
    summary = asyncio.run(run(args))
    summary["total_s"] = round(time.perf_counter() - began, 1)
    sections = [summary[name] for name in summary["sections"] if name in summary]
    goals = [section.get("goal_met") for section in sections]
    judged = [g for g in goals if g is not None]
    summary["all_goals_met"] = all(judged) if judged else None
    out(
        f"total {summary['total_s']} s; goals met: {sum(judged)} of {len(judged)} judged "
        f"({len(goals) - len(judged)} n/a)"
    )
    out(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
