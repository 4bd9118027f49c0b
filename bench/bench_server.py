"""latentcast server benchmark: overhead, cancel latency and fan-out, on loopback.

Usage::

    python bench/bench_server.py [--quick] [--section a|b|c] [--cache-dir DIR]

One in-process :class:`~latentcast.server.app.Server` on 127.0.0.1 (port 0) serves every
section; the clients are real WebSocket connections in the same process and event loop.

(a) overhead   a 20-step 256x256 guidance-7.5 job with progress and a latent preview every
               step, through the server (submit sent -> complete received) against the same
               job through the pipeline called directly in-process, interleaved
               (direct, server, direct, server, ...) after one warm-up of each.
               Goal: median(server) / median(direct) <= 1.05.
(b) cancel     (1) a running job is cancelled at a random moment within a step: time from
               sending cancel to receiving cancelled, and the same in steps (cancelled.step
               minus the last progress step seen when cancel was sent).
               Goal: p50 <= one step + 10 ms.
               (2) a queued job (behind a running one) is cancelled: cancel -> cancelled.
               Goal: <= 10 ms.
(c) fan-out    100 sessions each submit two small jobs at once; every job must get exactly
               one terminal message; wall time, jobs/s and the event loop's lag (an
               asyncio.sleep(0.01) probe in the same loop) while they run.
               Goal: nothing lost.

Readable lines go to stdout; the last line is one JSON object with every figure. Every
loop is bounded and every wait has a timeout, so the script always stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import logging
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from websockets.asyncio.client import ClientConnection, connect

from latentcast.protocol import (
    TERMINAL_ERROR_CODES,
    TERMINAL_TYPES,
    Cancel,
    GenerationParams,
    PreviewRequest,
    Submit,
    Welcome,
    decode_server_message,
    encode_message,
)
from latentcast.server.app import Server
from latentcast.server.config import ServerConfig
from latentcast.server.engine import diffusers_arguments
from latentcast.server.jobs import GenerationRequest
from latentcast.server.models import default_cache_dir

HOST = "127.0.0.1"
PROMPT = "a watercolour painting of a lighthouse at dusk"
WAIT = 120.0  # the longest any single wait may take before the run is declared broken

GOAL_OVERHEAD_RATIO = 1.05
GOAL_CANCEL_EXTRA_MS = 10.0
GOAL_QUEUED_CANCEL_MS = 10.0

# --------------------------------------------------------------------------- small helpers


def out(line: str = "") -> None:
    print(line, flush=True)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100); nan for no values."""
    if not values:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    with contextlib.suppress(OSError):
        return [round(x, 2) for x in os.getloadavg()]
    return []


# --------------------------------------------------------------------------- the client


def is_terminal(message: Any) -> bool:
    if message.type not in TERMINAL_TYPES:
        return False
    if message.type == "error":
        return message.id is not None and message.code in TERMINAL_ERROR_CODES
    return True


@dataclass
class JobTrace:
    """What one client saw of one job, with perf_counter receive times."""

    id: str
    submitted_at: float = 0.0
    answer: Any = None  # accepted, or the error that rejected the submit
    answered_at: float = 0.0
    progress: list[tuple[float, int]] = field(default_factory=list)  # (time, step)
    previews: int = 0
    queued: int = 0  # queued (position) updates
    messages: int = 0  # every message about the job
    terminal: Any = None
    terminal_at: float = 0.0
    terminals: int = 0  # must end up exactly 1 for an accepted job
    after_terminal: int = 0  # messages about the job after its terminal: must stay 0
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    stepped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def last_step(self) -> int:
        return self.progress[-1][1] if self.progress else 0

    def step_times(self) -> list[float]:
        """Seconds between consecutive progress messages one step apart."""
        return [
            b[0] - a[0]
            for a, b in zip(self.progress, self.progress[1:], strict=False)
            if b[1] == a[1] + 1
        ]


class BenchClient:
    """One WebSocket session: a reader task files every message under its job."""

    def __init__(self, ws: ClientConnection, welcome: Welcome) -> None:
        self.ws = ws
        self.welcome = welcome
        self.jobs: dict[str, JobTrace] = {}
        self.other: list[Any] = []
        self.reader_error: BaseException | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(cls, url: str) -> BenchClient:
        ws = await connect(url, compression=None, max_size=None, open_timeout=WAIT)
        async with asyncio.timeout(WAIT):
            welcome = decode_server_message(await ws.recv())
        if not isinstance(welcome, Welcome):
            raise RuntimeError(f"expected welcome, got {welcome!r}")
        return cls(ws, welcome)

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                now = time.perf_counter()
                message = decode_server_message(frame)  # type: ignore[arg-type]
                job = self.jobs.get(getattr(message, "id", None) or "")
                if job is None:
                    self.other.append(message)
                    continue
                job.messages += 1
                if job.terminal is not None:
                    job.after_terminal += 1
                    if is_terminal(message):
                        job.terminals += 1
                    continue
                kind = message.type
                if kind == "accepted" or (kind == "error" and job.answer is None):
                    job.answer, job.answered_at = message, now
                    job.answered.set()
                    if kind == "error" and not is_terminal(message):
                        continue  # a rejected submit: the answer is all there is
                if kind == "progress":
                    job.progress.append((now, message.step))
                    job.stepped.set()
                elif kind == "preview":
                    job.previews += 1
                elif kind == "queued":
                    job.queued += 1
                elif is_terminal(message):
                    job.terminal, job.terminal_at = message, now
                    job.terminals += 1
                    job.ended.set()
                    job.stepped.set()
        except Exception as exc:  # noqa: BLE001 - reported by whoever waits
            self.reader_error = exc
        finally:
            for job in self.jobs.values():  # wake every waiter: nothing more will come
                job.answered.set()
                job.ended.set()
                job.stepped.set()

    async def submit(
        self, job_id: str, *, preview: PreviewRequest | None = None, **params: Any
    ) -> JobTrace:
        job = self.jobs[job_id] = JobTrace(job_id)
        frame = encode_message(
            Submit(
                id=job_id,
                params=GenerationParams(prompt=PROMPT, **params),
                preview=preview or PreviewRequest(),
            )
        )
        job.submitted_at = time.perf_counter()
        await self.ws.send(frame)
        return job

    async def cancel(self, job_id: str) -> float:
        """Send a cancel; returns the perf_counter time just before it was sent."""
        frame = encode_message(Cancel(id=job_id))
        sent_at = time.perf_counter()
        await self.ws.send(frame)
        return sent_at

    async def wait(self, event: asyncio.Event, within: float = WAIT) -> None:
        async with asyncio.timeout(within):
            await event.wait()
        if self.reader_error is not None:
            raise RuntimeError(f"connection failed: {self.reader_error!r}")

    async def wait_step(self, job: JobTrace, step: int, within: float = WAIT) -> None:
        """Until a progress with at least ``step`` (or the job's end) has been read."""
        async with asyncio.timeout(within):
            while job.last_step < step and job.terminal is None:
                job.stepped.clear()
                await self.wait(job.stepped)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader


async def finish_job(client: BenchClient, job: JobTrace) -> JobTrace:
    await client.wait(job.ended)
    if job.terminal is None:
        raise RuntimeError(f"job {job.id}: connection ended without a terminal message")
    return job


# --------------------------------------------------------------------------- the sections


@dataclass
class Bench:
    server: Server
    quick: bool
    rng: random.Random
    summary: dict[str, Any]

    @property
    def url(self) -> str:
        return self.server.ws_url

    def model(self) -> Any:
        assert self.server.model is not None
        return self.server.model

    # ---------------------------------------------------------------- (a) overhead

    async def overhead(self, pairs: int) -> None:
        out("== (a) overhead: server vs direct pipeline call ==")
        size, steps, guidance, seed = 256, 20, 7.5, 1234
        model = self.model()
        preview = PreviewRequest(kind="latent", every=1)
        request = GenerationRequest(
            prompt=PROMPT,
            negative_prompt="",
            width=size,
            height=size,
            steps=steps,
            guidance_scale=guidance,
            seed=seed,
            scheduler=model.default_scheduler,
            num_images=1,
            preview=preview,
        )

        def direct_once() -> tuple[float, Image.Image]:
            started = time.perf_counter()
            pipeline = model.pipeline
            pipeline.scheduler = model.make_scheduler(request.scheduler)
            result = pipeline(**diffusers_arguments(request))
            return time.perf_counter() - started, result.images[0]

        async def direct() -> tuple[float, Image.Image]:
            # On the engine's own thread (same torch thread count); the server is idle.
            return await self.server.engine_thread.call(direct_once)

        client = await BenchClient.open(self.url)
        counter = 0

        async def through_server() -> tuple[float, JobTrace]:
            nonlocal counter
            counter += 1
            job = await client.submit(
                f"a{counter}",
                preview=preview,
                width=size,
                height=size,
                steps=steps,
                guidance_scale=guidance,
                seed=seed,
            )
            await finish_job(client, job)
            if job.terminal.type != "complete":
                raise RuntimeError(f"overhead job ended with {job.terminal!r}")
            return job.terminal_at - job.submitted_at, job

        try:
            warm_direct, direct_image = await direct()
            warm_server, warm_job = await through_server()
            out(f"warm-up      direct {warm_direct:7.3f} s   server {warm_server:7.3f} s")
            served = Image.open(io.BytesIO(warm_job.terminal.images[0].data)).convert("RGB")
            same = np.array_equal(np.asarray(served), np.asarray(direct_image.convert("RGB")))
            out(f"same image from both paths: {'yes' if same else 'NO'}")
            direct_times: list[float] = []
            server_times: list[float] = []
            for i in range(pairs):
                d, _ = await direct()
                s, job = await through_server()
                direct_times.append(d)
                server_times.append(s)
                out(
                    f"pair {i + 1}/{pairs}   direct {d:7.3f} s   server {s:7.3f} s   "
                    f"ratio {s / d:5.3f}   (server: {len(job.progress)} progress, "
                    f"{job.previews} previews, run_ms {job.terminal.timings.run_ms})"
                )
        finally:
            await client.close()
        med_d, med_s = median(direct_times), median(server_times)
        ratio = med_s / med_d
        ok = ratio <= GOAL_OVERHEAD_RATIO
        out(f"median direct {med_d:.3f} s, median server {med_s:.3f} s")
        out(
            f"overhead ratio median(server)/median(direct) = {ratio:.3f}   "
            f"goal <= {GOAL_OVERHEAD_RATIO}: {verdict(ok)}"
        )
        out()
        self.summary["a"] = {
            "job": {"width": size, "height": size, "steps": steps, "guidance_scale": guidance},
            "pairs": pairs,
            "direct_s": [round(x, 4) for x in direct_times],
            "server_s": [round(x, 4) for x in server_times],
            "median_direct_s": round(med_d, 4),
            "median_server_s": round(med_s, 4),
            "ratio": round(ratio, 4),
            "same_image": same,
            "goal_ratio": GOAL_OVERHEAD_RATIO,
            "goal_met": ok,
        }

    # ---------------------------------------------------------------- (b) cancel

    async def cancel_running(self, repeats: int) -> None:
        out("== (b1) cancel a running job ==")
        size, steps, guidance = 256, 150, 7.5
        params = {"width": size, "height": size, "steps": steps, "guidance_scale": guidance}
        client = await BenchClient.open(self.url)
        latencies_ms: list[float] = []
        in_steps: list[int] = []
        step_times: list[float] = []
        try:
            # Warm-up: this size once, cancelled after a few steps.
            job = await client.submit("b1-warm", **params)
            await client.wait_step(job, 3)
            await client.cancel(job.id)
            await finish_job(client, job)
            for i in range(repeats):
                job = await client.submit(f"b1-{i}", **params)
                await client.wait_step(job, 3)
                seen = job.step_times() or step_times
                step_estimate = median(seen) if seen else 0.1
                await asyncio.sleep(self.rng.uniform(0.0, step_estimate))
                last_seen = job.last_step
                sent_at = await client.cancel(job.id)
                await finish_job(client, job)
                end = job.terminal
                if end.type != "cancelled":
                    raise RuntimeError(f"cancelled job ended with {end!r}")
                ms = (job.terminal_at - sent_at) * 1000
                latencies_ms.append(ms)
                in_steps.append(end.step - last_seen)
                step_times.extend(job.step_times())
                out(
                    f"run {i + 1:2d}/{repeats}  cancel after step {last_seen:3d}  "
                    f"-> cancelled at step {end.step:3d}  {ms:7.1f} ms  "
                    f"({end.step - last_seen} step{'s' if end.step - last_seen != 1 else ''})"
                )
        finally:
            await client.close()
        step_ms = median(step_times) * 1000
        p50, p99 = percentile(latencies_ms, 50), percentile(latencies_ms, 99)
        steps50 = percentile([float(s) for s in in_steps], 50)
        steps99 = percentile([float(s) for s in in_steps], 99)
        ok = p50 <= step_ms + GOAL_CANCEL_EXTRA_MS
        out(f"median step time (from progress messages, {len(step_times)} steps): {step_ms:.1f} ms")
        out(f"cancel -> cancelled  p50 {p50:.1f} ms  p99 {p99:.1f} ms  max {max(latencies_ms):.1f}")
        out(f"in steps             p50 {steps50:.1f}     p99 {steps99:.1f}     max {max(in_steps)}")
        out(
            f"goal p50 <= one step + {GOAL_CANCEL_EXTRA_MS:.0f} ms "
            f"({step_ms + GOAL_CANCEL_EXTRA_MS:.1f} ms): {verdict(ok)}"
        )
        out()
        self.summary["b_running"] = {
            "job": params,
            "repeats": repeats,
            "latency_ms": [round(x, 2) for x in latencies_ms],
            "steps": in_steps,
            "p50_ms": round(p50, 2),
            "p99_ms": round(p99, 2),
            "p50_steps": steps50,
            "p99_steps": steps99,
            "median_step_ms": round(step_ms, 2),
            "goal_p50_ms": round(step_ms + GOAL_CANCEL_EXTRA_MS, 2),
            "goal_met": ok,
        }

    async def cancel_queued(self, repeats: int) -> None:
        out("== (b2) cancel a queued job ==")
        running = {"width": 256, "height": 256, "steps": 150, "guidance_scale": 7.5}
        client = await BenchClient.open(self.url)
        latencies_ms: list[float] = []
        not_queued = 0
        long_jobs = 0
        try:
            long_job: JobTrace | None = None
            for i in range(repeats):
                if long_job is None or long_job.terminal is not None:
                    long_jobs += 1
                    long_job = await client.submit(f"b2-long-{long_jobs}", **running)
                    await client.wait_step(long_job, 1)
                # A random moment within the running job's step.
                await asyncio.sleep(self.rng.uniform(0.0, 0.1))
                job = await client.submit(f"b2-{i}", width=64, height=64, steps=2)
                await client.wait(job.answered)
                if job.answer.type != "accepted":
                    raise RuntimeError(f"queued submit rejected: {job.answer!r}")
                sent_at = await client.cancel(job.id)
                await finish_job(client, job)
                end = job.terminal
                if end.type != "cancelled" or end.step != 0 or long_job.terminal is not None:
                    not_queued += 1  # it had started after all: not a queued cancel
                    continue
                latencies_ms.append((job.terminal_at - sent_at) * 1000)
            if long_job is not None and long_job.terminal is None:
                await client.cancel(long_job.id)
                await finish_job(client, long_job)
        finally:
            await client.close()
        p50, p99 = percentile(latencies_ms, 50), percentile(latencies_ms, 99)
        ok = p99 <= GOAL_QUEUED_CANCEL_MS
        out(f"{len(latencies_ms)} queued cancels ({not_queued} discarded: the job had started)")
        out(
            f"cancel -> cancelled  p50 {p50:.2f} ms  p99 {p99:.2f} ms  "
            f"max {max(latencies_ms):.2f} ms"
        )
        out(f"goal <= {GOAL_QUEUED_CANCEL_MS:.0f} ms (checked at p99): {verdict(ok)}")
        out()
        self.summary["b_queued"] = {
            "repeats": repeats,
            "samples": len(latencies_ms),
            "discarded": not_queued,
            "latency_ms": [round(x, 3) for x in latencies_ms],
            "p50_ms": round(p50, 3),
            "p99_ms": round(p99, 3),
            "max_ms": round(max(latencies_ms), 3),
            "goal_ms": GOAL_QUEUED_CANCEL_MS,
            "goal_met": ok,
        }

    # ---------------------------------------------------------------- (c) fan-out

    async def fan_out(self, sessions: int, jobs_each: int) -> None:
        out(f"== (c) fan-out: {sessions} sessions x {jobs_each} jobs ==")
        # guidance 1: no classifier-free guidance, half the UNet work; the engine is not
        # what this section measures.
        params = {"width": 64, "height": 64, "steps": 2, "guidance_scale": 1.0}
        # Warm-up: this size once, outside the measurement.
        warm = await BenchClient.open(self.url)
        try:
            await finish_job(warm, await warm.submit("c-warm", **params))
        finally:
            await warm.close()

        connect_started = time.perf_counter()
        clients = await asyncio.gather(*(BenchClient.open(self.url) for _ in range(sessions)))
        connect_s = time.perf_counter() - connect_started
        out(f"{len(clients)} sessions connected in {connect_s:.2f} s")

        lags: list[float] = []
        probing = True

        async def probe(samples: list[float], until: float = float("inf")) -> None:
            interval = 0.01
            while probing and time.perf_counter() < until:
                before = time.perf_counter()
                await asyncio.sleep(interval)
                samples.append(max(0.0, time.perf_counter() - before - interval))

        # The same probe with the sessions connected but idle, for comparison.
        idle_lags: list[float] = []
        await probe(idle_lags, until=time.perf_counter() + 1.0)
        idle_ms = [x * 1000 for x in idle_lags]
        out(
            f"event-loop lag while idle ({len(idle_ms)} samples): "
            f"p50 {percentile(idle_ms, 50):.1f} ms  p99 {percentile(idle_ms, 99):.1f} ms"
        )

        async def one_session(client: BenchClient, n: int) -> list[JobTrace]:
            jobs = [await client.submit(f"c{n}-{k}", **params) for k in range(jobs_each)]
            for job in jobs:
                with contextlib.suppress(TimeoutError, RuntimeError):
                    await client.wait(job.answered)
                    if job.answer is not None and job.answer.type == "accepted":
                        await client.wait(job.ended)
            return jobs

        probe_task = asyncio.create_task(probe(lags))
        started = time.perf_counter()
        try:
            results = await asyncio.gather(
                *(one_session(client, n) for n, client in enumerate(clients))
            )
            wall = time.perf_counter() - started
        finally:
            probing = False
            await probe_task
            await asyncio.sleep(0.2)  # let any stray message after a terminal arrive
            await asyncio.gather(*(client.close() for client in clients))

        jobs = [job for session_jobs in results for job in session_jobs]
        accepted = [j for j in jobs if j.answer is not None and j.answer.type == "accepted"]
        rejected = [j for j in jobs if j.answer is not None and j.answer.type == "error"]
        unanswered = [j for j in jobs if j.answer is None]
        terminals = sum(j.terminals for j in accepted)
        lost = sum(1 for j in accepted if j.terminals == 0) + len(unanswered)
        doubled = sum(1 for j in accepted if j.terminals > 1)
        after = sum(j.after_terminal for j in jobs)
        outcomes: dict[str, int] = {}
        for j in accepted:
            if j.terminal is not None:
                key = j.terminal.type if j.terminal.type != "error" else j.terminal.code
                outcomes[key] = outcomes.get(key, 0) + 1
        expected = sessions * jobs_each
        lag_ms = [x * 1000 for x in lags]
        run_ms = [
            j.terminal.timings.run_ms
            for j in accepted
            if j.terminal is not None and j.terminal.type == "complete"
        ]
        engine_busy = sum(run_ms) / 1000 / wall
        out(
            f"submitted {expected}, accepted {len(accepted)}, rejected {len(rejected)}, "
            f"unanswered {len(unanswered)}"
        )
        out(f"terminal messages received: {terminals} of {expected}  outcomes {outcomes}")
        out(f"lost: {lost}   (more than one terminal: {doubled}; messages after terminal: {after})")
        messages = sum(j.messages for j in jobs)
        queued_updates = sum(j.queued for j in jobs)
        out(f"wall {wall:.2f} s   {expected / wall:.1f} jobs/s")
        out(f"messages received about the jobs: {messages} ({queued_updates} of them queued)")
        out(
            f"per job run_ms (started -> complete, server's timings): median "
            f"{median(run_ms):.0f} ms; sum of run_ms / wall = {engine_busy:.2f}"
        )
        out(
            f"event-loop lag (sleep(0.01) probe, {len(lag_ms)} samples): "
            f"p50 {percentile(lag_ms, 50):.1f} ms  p99 {percentile(lag_ms, 99):.1f} ms  "
            f"max {max(lag_ms, default=float('nan')):.1f} ms"
        )
        ok = lost == 0 and doubled == 0 and after == 0 and not rejected and terminals == expected
        out(f"goal: loses nothing, exactly one terminal per job: {verdict(ok)}")
        out()
        self.summary["c"] = {
            "sessions": sessions,
            "jobs_per_session": jobs_each,
            "job": params,
            "connect_s": round(connect_s, 3),
            "accepted": len(accepted),
            "rejected": len(rejected),
            "terminals": terminals,
            "outcomes": outcomes,
            "lost": lost,
            "more_than_one_terminal": doubled,
            "after_terminal": after,
            "wall_s": round(wall, 3),
            "jobs_per_s": round(expected / wall, 2),
            "median_run_ms": median(run_ms),
            "messages": messages,
            "queued_messages": queued_updates,
            "run_ms_sum_over_wall": round(engine_busy, 3),
            "idle_loop_lag_p50_ms": round(percentile(idle_ms, 50), 2),
            "idle_loop_lag_p99_ms": round(percentile(idle_ms, 99), 2),
            "loop_lag_p50_ms": round(percentile(lag_ms, 50), 2),
            "loop_lag_p99_ms": round(percentile(lag_ms, 99), 2),
            "loop_lag_max_ms": round(max(lag_ms, default=float("nan")), 2),
            "goal_met": ok,
        }


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the latentcast server on loopback (see the module docstring)."
    )
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (< ~1 min)")
    parser.add_argument(
        "--section",
        choices=["a", "b", "c"],
        action="append",
        help="run only this section (repeatable); default: all",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help=f"where the tiny model is built and cached (default {default_cache_dir()})",
    )
    parser.add_argument("--model", default="tiny", help="model spec, as for latentcast serve")
    parser.add_argument("--device", default="auto", help="device, as for latentcast serve")
    parser.add_argument("--pairs", type=int, default=None, help="(a) interleaved pairs")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random cancel moments")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sections = args.section or ["a", "b", "c"]
    quick = args.quick
    pairs = args.pairs or (2 if quick else 5)
    load_before = load_average()
    summary: dict[str, Any] = {
        "quick": quick,
        "sections": sections,
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "cores_usable": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "diffusers": version("diffusers"),
            "websockets": version("websockets"),
            "load_average_before": load_before,
        },
    }
    machine = summary["machine"]
    out("latentcast server benchmark")
    out(f"cpu      {machine['cpu']} ({machine['cores']} cores, {machine['cores_usable']} usable)")
    out(
        f"python   {machine['python']}   torch {machine['torch']} "
        f"({machine['torch_threads']} threads)   diffusers {machine['diffusers']}   "
        f"websockets {machine['websockets']}"
    )
    out(f"load avg {' '.join(map(str, load_before))} (1/5/15 min, before)")

    cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    config = ServerConfig(
        host=HOST,
        port=0,
        model=args.model,
        device=args.device,
        cache_dir=cache_dir,
        max_queue=256,
        log_level="warning",
    )
    loaded = time.perf_counter()
    async with Server(config) as server:
        async with asyncio.timeout(600):
            await server.wait_ready()
        assert server.model is not None
        machine["device"] = str(server.model.device)
        machine["dtype"] = str(server.model.dtype).removeprefix("torch.")
        machine["model"] = server.model.name
        machine["engine_threads"] = await server.engine_thread.call(torch.get_num_threads)
        out(f"engine   {machine['engine_threads']} torch threads on the engine thread")
        out(
            f"device   {machine['device']} ({machine['dtype']}), model {machine['model']}, "
            f"loaded in {time.perf_counter() - loaded:.1f} s, cache {cache_dir}"
        )
        out(f"mode     {'quick' if quick else 'full'}, sections {' '.join(sections)}")
        out()
        bench = Bench(server, quick, random.Random(args.seed), summary)
        steps: list[Callable[[], Awaitable[None]]] = []
        if "a" in sections:
            steps.append(lambda: bench.overhead(pairs))
        if "b" in sections:
            steps.append(lambda: bench.cancel_running(5 if quick else 20))
            steps.append(lambda: bench.cancel_queued(10 if quick else 50))
        if "c" in sections:
            steps.append(lambda: bench.fan_out(100, 2))
        for step in steps:
            async with asyncio.timeout(900):
                await step()
    machine["load_average_after"] = load_average()
    out(f"load avg {' '.join(map(str, machine['load_average_after']))} (1/5/15 min, after)")
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    started = time.perf_counter()
    summary = asyncio.run(run(args))
    summary["total_s"] = round(time.perf_counter() - started, 1)
    goals = [v["goal_met"] for v in summary.values() if isinstance(v, dict) and "goal_met" in v]
    summary["all_goals_met"] = all(goals)
    out(f"total {summary['total_s']} s; goals met: {sum(goals)} of {len(goals)}")
    out(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
