"""Step batching over real sockets (issue 9): determinism, stops inside a batch, admission.

Jobs share UNet calls when they run together (PROTOCOL.md 5.6, 5.8). What a client must
still see:

* a job alone gives the diffusers pipeline's bytes; the same job sharing UNet calls with
  other jobs gives the same image up to rounding (every family, mode and scheduler, a
  LoRA, two images per job);
* a job cancelled, replaced or disconnected inside a batch stops within a step or two,
  and the jobs it shared steps with go on as if it had never been there;
* jobs are admitted in fairness order, and a job of another size never waits for a
  batch to finish (groups take turns);
* ``--max-batch 1`` runs one job at a time.

To make jobs really share calls they are submitted from several sessions while the
engine thread is held (:func:`tests.support.engine_hold`), and the
``latentcast_unet_rows`` histogram shows how many rows the UNet calls had.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from latentcast.protocol import Accepted, Cancelled, Complete, GenerationParams, Progress, Started
from latentcast.protocol.limits import DEFAULT_STRENGTH
from latentcast.server.engine import diffusers_arguments
from latentcast.server.images import composite, prepare_images
from latentcast.server.jobs import GenerationRequest
from latentcast.server.previews import encode_image
from tests.fixtures.loras import build_tiny_lora
from tests.integration.test_breadth import noise, png
from tests.support import (
    BATCH_ROUNDING,
    LONG_JOB,
    ONE_AT_A_TIME,
    Client,
    engine_hold,
    is_terminal,
    largest_difference,
    metric_samples,
    open_client,
    wait_for,
)

ROWS = "latentcast_unet_rows"
PROMPT = "a cat"
#: Every server here: one torch thread. On a 2-core machine two torch threads beside the
#: event loop (and whatever else runs) can make a 0.1 s job take seconds.
ONE_THREAD = {"cpu_threads": 1}

# ---------------------------------------------------------------------- helpers


def submit_message(job_id: str, fields: dict[str, Any]) -> dict[str, Any]:
    """A submit of ``fields`` (params, plus ``replaces``), with this module's prompt."""
    params = {"prompt": PROMPT, "steps": 2, **fields}
    message: dict[str, Any] = {"type": "submit", "id": job_id, "params": params}
    if "replaces" in params:
        message["replaces"] = params.pop("replaces")
    return message


async def run_alone(client: Client, job_id: str, fields: dict[str, Any]) -> Complete:
    """Submit one job and wait for its end: nothing else runs, so it runs alone."""
    await client.send(submit_message(job_id, fields))
    end = (await client.job_messages(job_id))[-1]
    assert isinstance(end, Complete), end
    return end


async def until_ended(client: Client, ids: Iterable[str]) -> list[Any]:
    """Everything ``client`` receives until each job in ``ids`` has ended."""
    left = set(ids)

    def done(message: Any) -> bool:
        if is_terminal(message):
            left.discard(message.id)
        return not left

    if not left:
        return []
    return await client.recv_until(done)


def about(client: Client, job_id: str) -> list[Any]:
    """Every message ``client`` has received about ``job_id``."""
    return [m for m in client.received if getattr(m, "id", None) == job_id]


def arrival(client: Client, job_id: str, kind: type, **fields: Any) -> float:
    """When ``client`` received the first ``kind`` message about ``job_id`` with ``fields``."""
    for at, message in client.timeline:
        if (
            isinstance(message, kind)
            and message.id == job_id
            and all(getattr(message, name) == value for name, value in fields.items())
        ):
            return at
    raise AssertionError(f"no {kind.__name__} {fields} for {job_id}")


def unet_rows(server: Any) -> tuple[float, float]:
    """(UNet calls, rows in them) so far."""
    samples = metric_samples(server, ROWS)
    return samples.get("count", 0.0), samples.get("sum", 0.0)


def server_job(server: Any, job_id: str) -> Any:
    """The server's unfinished ``Job`` with this id (ids are unique across this module's
    sessions)."""
    (job,) = [job for job in server.scheduler.unfinished if job.id == job_id]
    return job


@asynccontextmanager
async def engine_frozen(server: Any) -> AsyncIterator[None]:
    """Like :func:`tests.support.engine_hold`, but entered only once the engine thread is
    really held: no step runs inside the block, and the steps done so far are final."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(120)

    held = asyncio.ensure_future(server.engine_thread.call(hold))
    try:
        await wait_for(entered.is_set)
        yield
    finally:
        release.set()
        await held


async def read_for(clients: Iterable[Client], seconds: float) -> None:
    """Read whatever ``clients`` are sent for ``seconds`` (kept in their ``received``)."""

    async def drain(client: Client) -> None:
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                await client.recv(timeout=left)
            except TimeoutError:
                return

    await asyncio.gather(*(drain(client) for client in clients))


def progress_steps(client: Client, job_id: str) -> list[int]:
    return [m.step for m in about(client, job_id) if isinstance(m, Progress)]


# ---------------------------------------------------------------------- 1. determinism

MODELS = ["tiny", "tiny-sdxl", "tiny-inpaint"]
LORA_STRENGTH = 0.2
NO_LORA = "lora-txt2img-without-it"


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny LoRA for each family (built once for the module)."""
    folder = tmp_path_factory.mktemp("loras")
    # Weaker than the fixture's default (0.5): with that, tiny-sdxl's UNet is so badly
    # conditioned that float32 is 1e-3 from float64 alone as well as batched, and the
    # last-bit differences of a batch grow to tens of levels in three steps.
    return {
        "tiny": build_tiny_lora(folder / "sd1", strength=LORA_STRENGTH),
        "tiny-sdxl": build_tiny_lora(folder / "sdxl", sdxl=True, strength=LORA_STRENGTH),
    }


def job_kinds(model_name: str, schedulers: list[str]) -> dict[str, dict[str, Any]]:
    """One job of each kind the model can run, each with its own seed and prompt."""
    init = png(noise(64, 64, seed=3))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 8:40] = 255
    inpaint = {"init_image": init, "mask": png(Image.fromarray(mask)), "steps": 3}
    lora = {"loras": [{"name": "style", "scale": 1.0}]}
    kinds: dict[str, dict[str, Any]] = {}
    if model_name == "tiny-inpaint":
        # The 9-channel UNet: inpaint only, with every scheduler.
        for name in schedulers:
            kinds[f"inpaint-{name}"] = {**inpaint, "scheduler": name}
        kinds["inpaint-unguided"] = {**inpaint, "guidance_scale": 1.0}
        kinds["inpaint-two-images"] = {**inpaint, "num_images": 2, "strength": 1.0}
    else:
        for name in schedulers:
            kinds[f"txt2img-{name}"] = {"scheduler": name, "steps": 3}
        kinds["txt2img-unguided"] = {"guidance_scale": 1.0, "steps": 3}
        kinds["txt2img-negative"] = {"negative_prompt": "blurry", "steps": 3}
        kinds["txt2img-two-images"] = {"num_images": 2, "scheduler": "euler_a"}
        kinds["img2img"] = {"init_image": init, "strength": 0.6, "steps": 4}
        kinds["img2img-two-images"] = {"init_image": init, "num_images": 2, "steps": 3}
        kinds["inpaint"] = inpaint
        # Two LoRA jobs: they form a group of their own (one LoRA selection per call).
        kinds["lora-txt2img"] = {**lora, "steps": 3}
        kinds["lora-img2img"] = {**lora, "init_image": init, "strength": 0.7, "steps": 3}
        # lora-txt2img without its LoRA, to show that the LoRA changes the image.
        kinds[NO_LORA] = {"steps": 3}
    for k, fields in enumerate(kinds.values()):
        fields.setdefault("seed", 100 + k)
        fields["prompt"] = f"{PROMPT} number {k}"
    if NO_LORA in kinds:
        kinds[NO_LORA].update(
            seed=kinds["lora-txt2img"]["seed"], prompt=kinds["lora-txt2img"]["prompt"]
        )
    return kinds


def request_for(fields: dict[str, Any], welcome: Any) -> GenerationRequest:
    """The request the server makes of these params (as Session._submit does)."""
    params = GenerationParams(**{"prompt": PROMPT, "steps": 2, **fields})
    defaults = welcome.defaults
    init_image = mask = None
    width, height = params.width or defaults.width, params.height or defaults.height
    if params.init_image is not None:
        init_image, mask, width, height = prepare_images(params, welcome.limits)
    assert params.seed is not None
    return GenerationRequest(
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=width,
        height=height,
        steps=params.steps or defaults.steps,
        guidance_scale=(
            params.guidance_scale if params.guidance_scale is not None else defaults.guidance_scale
        ),
        seed=params.seed,
        scheduler=params.scheduler or defaults.scheduler,
        num_images=params.num_images,
        mode=params.mode,
        init_image=init_image,
        mask=mask,
        strength=params.strength if params.strength is not None else DEFAULT_STRENGTH,
        loras=tuple((lora.name, lora.scale) for lora in params.loras),
    )


def pipeline_pngs(model: Any, request: GenerationRequest) -> list[bytes]:
    """The diffusers pipeline called directly (on the engine thread), as PNGs."""
    pipeline = model.pipeline_for(request.mode)
    pipeline.scheduler = model.make_scheduler(request.scheduler)
    model.activate_loras(request.loras)
    return as_sent(pipeline(**diffusers_arguments(request)).images, request)


def as_sent(images: list[Any], request: GenerationRequest) -> list[bytes]:
    """A pipeline's images as the server sends them: inpaint composited, as PNGs."""
    if request.mode == "inpaint":
        images = [composite(image, request.init_image, request.mask) for image in images]
    return [encode_image(image, "png") for image in images]


@pytest.mark.parametrize("model_name", MODELS)
async def test_a_job_alone_is_the_pipeline_and_in_a_batch_the_same_up_to_rounding(
    start_server, lora_files, model_name
) -> None:
    """PROTOCOL.md 5.8, for every kind of job: alone, the bytes of the pipeline called
    directly; sharing UNet calls with all the others, its lone image up to rounding."""
    options: dict[str, Any] = {"model": model_name, "max_batch": 64, **ONE_THREAD}
    if model_name in lora_files:
        options["loras"] = (f"style={lora_files[model_name]}",)
    async with start_server(**options) as server:
        loner = await open_client(server.ws_url)
        welcome = loner.welcome
        assert "batching" in welcome.features
        kinds = job_kinds(model_name, welcome.model.schedulers)
        largest_job = 0

        alone: dict[str, list[bytes]] = {}
        for name, fields in kinds.items():
            calls, rows = unet_rows(server)
            complete = await run_alone(loner, name, fields)
            alone[name] = [image.data for image in complete.images]
            # Alone, each of its UNet calls holds its own rows and no others.
            calls_now, rows_now = unet_rows(server)
            job_rows, remainder = divmod(rows_now - rows, calls_now - calls)
            assert remainder == 0, name
            largest_job = max(largest_job, int(job_rows))
            request = request_for(fields, welcome)
            # On the engine's own thread: torch's thread count is per thread.
            direct = await server.engine_thread.call(pipeline_pngs, server.model, request)
            assert alone[name] == direct, f"{name}: alone, not the pipeline's bytes"
        await loner.close()
        if NO_LORA in alone:
            # Far beyond rounding: a LoRA group stepped without its LoRA would show.
            lora_effect = largest_difference(alone["lora-txt2img"][0], alone[NO_LORA][0])
            assert lora_effect > 10 * BATCH_ROUNDING, lora_effect

        # All at once from four sessions, admitted while the engine is held: they share
        # UNet calls (the LoRA jobs among themselves).
        sessions = [await open_client(server.ws_url) for _ in range(4)]
        ids: dict[int, list[str]] = {k: [] for k in range(len(sessions))}
        calls, rows = unet_rows(server)
        async with engine_hold(server):
            for k, (name, fields) in enumerate(kinds.items()):
                which = k % len(sessions)
                ids[which].append(name)
                await sessions[which].send(submit_message(name, fields))
            for which, session in enumerate(sessions):
                last = ids[which][-1]
                await session.recv_until(lambda m, last=last: m.type == "accepted" and m.id == last)
        await asyncio.gather(
            *(until_ended(session, ids[which]) for which, session in enumerate(sessions))
        )
        calls_now, rows_now = unet_rows(server)
        assert (rows_now - rows) / (calls_now - calls) > largest_job, (
            "UNet calls held several jobs' rows"
        )

        differences = {}
        for session in sessions:
            for message in session.received:
                if is_terminal(message):
                    assert isinstance(message, Complete), message
                    together = [image.data for image in message.images]
                    assert len(together) == len(alone[message.id])
                    differences[message.id] = max(
                        largest_difference(a, b)
                        for a, b in zip(together, alone[message.id], strict=True)
                    )
            await session.close()
        assert differences.keys() == kinds.keys()
        assert max(differences.values()) <= BATCH_ROUNDING, sorted(differences.items())


# ---------------------------------------------------------------------- 2. stops in a batch

STEPS = 8
#: Four guided 64x64 jobs of 2 rows each: one UNet call of 8 rows (the CPU default).
BATCH = {f"j{k}": {"seed": 20 + k, "steps": STEPS, "prompt": f"job {k}"} for k in range(4)}
TARGET = "j0"
REPLACEMENT = {"seed": 30, "steps": STEPS, "prompt": "the replacement"}


@pytest.mark.parametrize("stop", ["cancel", "replace", "disconnect"])
async def test_a_job_stopped_inside_a_batch_leaves_the_others_as_they_were(
    start_server, stop
) -> None:
    """Four jobs share steps; one is cancelled, replaced or its client disconnects. It
    ends within one step; the other three complete every step, with their lone images
    up to rounding (and a replacing job completes the same way)."""
    async with start_server(model="tiny", max_batch=8, **ONE_THREAD) as server:
        loner = await open_client(server.ws_url)
        others = [job_id for job_id in BATCH if job_id != TARGET]
        alone = {
            job_id: (await run_alone(loner, f"{job_id}-alone", BATCH[job_id])).images[0].data
            for job_id in others
        }
        if stop == "replace":
            alone["r"] = (await run_alone(loner, "r-alone", REPLACEMENT)).images[0].data
        await loner.close()

        clients = {job_id: await open_client(server.ws_url) for job_id in BATCH}
        target = clients[TARGET]
        calls, rows = unet_rows(server)
        async with engine_hold(server):
            for job_id, client in clients.items():
                await client.send(submit_message(job_id, BATCH[job_id]))
            for job_id, client in clients.items():
                await client.recv_until(lambda m, j=job_id: m.type == "accepted" and m.id == j)
        # Running together now: stop the target once it is a step in, with the engine
        # held so that it cannot advance while the stop travels.
        await target.recv_until(
            lambda m: isinstance(m, Progress) and m.id == TARGET and m.step >= 2
        )
        async with engine_frozen(server):
            job = server_job(server, TARGET)
            await read_for(clients.values(), 0.3)  # the last step's progress arrives
            frozen_at = job.step
            assert max(progress_steps(target, TARGET)) == frozen_at
            assert frozen_at < STEPS
            if stop == "cancel":
                await target.send({"type": "cancel", "id": TARGET})
            elif stop == "replace":
                await target.send(submit_message("r", {**REPLACEMENT, "replaces": TARGET}))
            else:
                await target.close()
            await wait_for(lambda: job.stop_requested)

        survivors = {job_id: clients[job_id] for job_id in others}
        if stop == "replace":
            survivors["r"] = target
        if stop != "disconnect":
            await until_ended(target, [TARGET])
        await asyncio.gather(
            *(until_ended(client, [job_id]) for job_id, client in survivors.items())
        )

        if stop == "disconnect":
            # Nobody is left to hear it: the rows it took tell how far it ran.
            calls_now, rows_now = unet_rows(server)
            stopped_at = int(rows_now - rows) // 2 - len(others) * STEPS
            assert not [m for m in about(target, TARGET) if is_terminal(m)]
        else:
            end = about(target, TARGET)[-1]
            assert isinstance(end, Cancelled), end
            assert end.reason == {"cancel": "client", "replace": "replaced"}[stop]
            stopped_at = end.step
        # PROTOCOL.md 5.5: a running job stops within one denoising step (here: the
        # step the engine had already taken up when it was held).
        assert frozen_at <= stopped_at <= frozen_at + 1, (frozen_at, stopped_at)
        assert TARGET not in {job.id for job in server.scheduler.unfinished}

        for job_id, client in survivors.items():
            messages = about(client, job_id)
            assert isinstance(messages[-1], Complete), (job_id, messages[-1])
            assert progress_steps(client, job_id) == list(range(1, STEPS + 1)), job_id
            difference = largest_difference(messages[-1].images[0].data, alone[job_id])
            assert difference <= BATCH_ROUNDING, (job_id, difference)

        # Every row accounted for: 2 per step of each job, none after the target stopped,
        # and calls that held several jobs.
        calls_now, rows_now = unet_rows(server)
        steps_run = len(others) * STEPS + stopped_at + (STEPS if stop == "replace" else 0)
        assert rows_now - rows == 2 * steps_run
        assert (rows_now - rows) / (calls_now - calls) > 2 * 2, "calls held several jobs"
        for client in clients.values():
            await client.close()


# ---------------------------------------------------------------------- 3. admission


async def test_a_late_session_is_admitted_before_a_backlog(start_server) -> None:
    """PROTOCOL.md 5.6 with batching: two unguided jobs fit a call (max_batch 2), and the
    late session's job joins the engine before the backlog's later jobs."""
    job = {"steps": 6, "guidance_scale": 1.0}
    async with start_server(model="tiny", max_batch=2, **ONE_THREAD) as server:
        busy = await open_client(server.ws_url)
        late = await open_client(server.ws_url)
        backlog = [f"b{k}" for k in range(6)]
        async with engine_hold(server):
            for job_id in backlog:
                await busy.send(submit_message(job_id, job))
            await busy.recv_until(lambda m: m.type == "accepted" and m.id == backlog[-1])
            await late.send(submit_message("l0", job))
            accepted = (await late.recv_until(lambda m: m.type == "accepted"))[-1]
            assert isinstance(accepted, Accepted) and accepted.position == 0
            jobs = {job.id: job for job in server.scheduler.unfinished}
        calls, rows = unet_rows(server)
        await asyncio.gather(until_ended(busy, backlog), until_ended(late, ["l0"]))

        # The server's admission order (start times), exact.
        order = sorted(jobs, key=lambda job_id: jobs[job_id].started_at)
        assert [job_id for job_id in order if job_id != "l0"] == backlog, order
        assert order.index("l0") <= 2, order
        # As the clients see it: b3 needs a job admitted with l0 to end first.
        started_late = arrival(late, "l0", Started)
        for job_id in backlog[3:]:
            assert started_late < arrival(busy, job_id, Started), job_id
        # Never more than two jobs in a call, and calls that held two.
        calls_now, rows_now = unet_rows(server)
        assert rows_now - rows == 7 * 6
        assert calls_now - calls < 7 * 6, "some calls held two jobs"
        assert _calls_above(server, 2) == 0
        await busy.close()
        await late.close()


async def test_a_job_of_another_size_never_waits_for_a_batch_to_finish(start_server) -> None:
    """Groups take turns step by step: a 64x64 job submitted while a long 256x256 job
    runs starts at once and completes within a few of the long job's steps, which goes
    on running."""
    small_steps = 3
    async with start_server(model="tiny", **ONE_THREAD) as server:
        long_client = await open_client(server.ws_url)
        small_client = await open_client(server.ws_url)
        await long_client.submit("long", **LONG_JOB)
        await long_client.recv_until(lambda m: isinstance(m, Progress) and m.id == "long")
        long_job = server_job(server, "long")

        await small_client.submit("small", steps=small_steps, width=64, height=64)
        accepted = (await small_client.recv_until(lambda m: m.type == "accepted"))[-1]
        long_at_accept = long_job.step
        assert accepted.position == 0
        messages = await small_client.job_messages("small", timeout=30)
        long_at_complete = long_job.step
        assert isinstance(messages[-1], Complete)
        assert [m.step for m in messages if isinstance(m, Progress)][-1] == small_steps
        # One long step per small step (they alternate), plus a few around admission
        # and the encoding of the small job's image.
        assert long_at_complete - long_at_accept <= small_steps + 3, (
            long_at_accept,
            long_at_complete,
        )
        assert long_job.unfinished
        # The long job keeps running.
        await long_client.recv_until(
            lambda m: isinstance(m, Progress) and m.id == "long" and m.step > long_at_complete + 1
        )
        await long_client.send({"type": "cancel", "id": "long"})
        end = (await long_client.job_messages("long"))[-1]
        assert isinstance(end, Cancelled) and end.reason == "client"
        assert end.step < LONG_JOB["steps"]
        await long_client.close()
        await small_client.close()


def _calls_above(server: Any, rows: int) -> int:
    """How many UNet calls so far had more than ``rows`` rows (a bucket bound)."""
    count = bucket = None
    for line in server.metrics.render().decode().splitlines():
        if line.startswith(f"{ROWS}_count "):
            count = float(line.split()[-1])
        elif line.startswith(f'{ROWS}_bucket{{le="{float(rows)}"}} '):
            bucket = float(line.split()[-1])
    assert count is not None and bucket is not None, f"no bucket le={rows}"
    return int(count - bucket)


# ---------------------------------------------------------------------- 4. one at a time


async def test_max_batch_one_runs_one_job_at_a_time(start_server) -> None:
    """``--max-batch 1``: no "batching" feature, each job starts after the one before it
    has done its last step, and no UNet call holds more than one job's rows."""
    job = {"steps": 4}  # guided: 2 rows, more than max_batch; such a job runs alone
    async with start_server(model="tiny", **ONE_AT_A_TIME, **ONE_THREAD) as server:
        first = await open_client(server.ws_url)
        second = await open_client(server.ws_url)
        assert "batching" not in first.welcome.features
        calls, rows = unet_rows(server)
        async with engine_hold(server):
            for k in range(2):
                await first.send(submit_message(f"a{k}", {**job, "seed": k}))
                await second.send(submit_message(f"b{k}", {**job, "seed": 10 + k}))
            for client, last in ((first, "a1"), (second, "b1")):
                await client.recv_until(lambda m, j=last: m.type == "accepted" and m.id == j)
            jobs = {job.id: job for job in server.scheduler.unfinished}
        await asyncio.gather(until_ended(first, ["a0", "a1"]), until_ended(second, ["b0", "b1"]))

        order = sorted(jobs, key=lambda job_id: jobs[job_id].started_at)
        assert order == ["a0", "b0", "a1", "b1"], order
        owner = {"a0": first, "a1": first, "b0": second, "b1": second}
        for before, after in itertools.pairwise(order):
            last_step = arrival(owner[before], before, Progress, step=job["steps"])
            # The next job starts once this one has done its last step (its terminal
            # message may come a little later: images are encoded beside the next step).
            assert last_step < arrival(owner[after], after, Started), (before, after)
        calls_now, rows_now = unet_rows(server)
        assert calls_now - calls == 4 * job["steps"]
        assert rows_now - rows == 2 * (calls_now - calls), "every call held one job's rows"
        await first.close()
        await second.close()


# ---------------------------------------------------------------------- 5. threads


class TorchCalls:
    """While installed: every torch function called on a thread other than the engine's.

    One parallel torch op on another thread (the event loop's, the encoder's) gives that
    thread an OpenMP pool of its own for as long as it lives, and with more OpenMP
    threads than cores libgomp stops spin-waiting: every parallel op of the engine then
    pays futex wake-ups (a 256x256 job 20-30% slower on 2 cores). The server keeps all
    torch work on the engine thread; this watches the Python side of that promise.
    """

    def __init__(self) -> None:
        self._calls: list[tuple[threading.Thread, str]] = []

    @property
    def calls(self) -> list[tuple[str, str]]:
        """(thread, function) of the calls made on threads still alive: a thread that
        has ended (like the pool transformers loads weights with) took its OpenMP pool
        with it."""
        return [(thread.name, name) for thread, name in self._calls if thread.is_alive()]

    def __enter__(self) -> TorchCalls:
        threading.setprofile(self._hook)  # threads started from now on
        sys.setprofile(self._hook)  # this one: the event loop's
        return self

    def __exit__(self, *exc_info: object) -> None:
        sys.setprofile(None)
        threading.setprofile(None)  # type: ignore[arg-type]

    def _hook(self, frame: Any, event: str, arg: Any) -> None:
        thread = threading.current_thread()
        if thread.name in TORCH_THREADS:
            sys.setprofile(None)  # where torch belongs: stop watching this thread
        elif event == "c_call" and _is_torch(arg):
            self._calls.append((thread, getattr(arg, "__qualname__", repr(arg))))


#: The threads that run torch: the engine's, and the model loader's (one torch thread,
#: set before anything else it runs: server/engine/models.py).
TORCH_THREADS = ("latentcast-engine", "latentcast-loader")


def _is_torch(function: Any) -> bool:
    owner = getattr(function, "__self__", None)
    if isinstance(owner, torch.Tensor):
        return True
    module = getattr(function, "__module__", None)
    if module is None and owner is not None:
        module = getattr(owner if isinstance(owner, type) else type(owner), "__module__", None)
    return isinstance(module, str) and (module == "torch" or module.startswith("torch."))


async def test_no_thread_but_the_engines_runs_torch(model_cache: Path) -> None:
    """From start to a finished job with latent and image previews, torch runs only on the
    engine thread (the event loop's thread and the encoder pool never call it)."""
    from latentcast.server.config import ServerConfig

    config = ServerConfig(port=0, cache_dir=model_cache, model="tiny", cpu_threads=1)
    await _run_latent_and_image_jobs(config)


async def test_with_several_models_torch_runs_only_on_the_engine_and_loader_threads(
    model_cache: Path,
) -> None:
    """The same with two models and one loaded at a time: each job loads its model (on
    the loader thread, with one torch thread) after unloading the other."""
    from latentcast.server.config import ServerConfig

    config = ServerConfig(
        port=0,
        cache_dir=model_cache,
        model=("sd=tiny", "xl=tiny-sdxl"),
        max_resident_models=1,
        cpu_threads=1,
    )
    threads = await _run_latent_and_image_jobs(config, models=("xl", "sd"))
    assert threads == 1, "the loader thread runs torch on one thread"


async def _run_latent_and_image_jobs(
    config: Any, models: tuple[str | None, str | None] = (None, None)
) -> int | None:
    """Run a latent-preview and an image-preview job, watching torch; the loader
    thread's torch thread count (None when it never ran)."""
    from latentcast.server.app import Server

    loader_threads = None
    with TorchCalls() as watch:
        async with Server(config) as server:
            await server.wait_ready()
            client = await open_client(server.ws_url)
            for k, kind in enumerate(["latent", "image"]):
                fields: dict[str, Any] = {"steps": 3, "seed": k}
                if models[k] is not None:
                    fields["model"] = models[k]
                message = {**submit_message(f"j{k}", fields), "preview": {"kind": kind}}
                await client.send(message)
                messages = await client.job_messages(f"j{k}")
                assert isinstance(messages[-1], Complete), messages[-1]
                assert any(m.type == "preview" for m in messages), f"no {kind} preview"
            await client.close()
            calls = watch.calls
            if server.models is not None and len(server.models.names) > 1:
                loader_threads = await server.models.loader_thread.call(torch.get_num_threads)
    assert calls == [], f"torch called off the engine thread: {calls[:10]}"
    return loader_threads
