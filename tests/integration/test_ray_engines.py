"""Engines in Ray actors (issue 10), against a real local Ray cluster.

One cluster for the test session (the ``ray_cluster`` fixture: ``ray start --head
--block`` with 2 CPUs, as an operator starts one); every server here joins it
(``ray_address``) with engine actors of the tiny model, each loading the model in its
own process. The guarantees every engine must keep (order, fairness, cancel, replace,
drain, slow readers) run against Ray engines as well: the tests marked
``both_engines`` in the other modules. What a client must see here:

* jobs from several sessions run on both engines, each engine's images are the embedded
  engine's bytes (results encoded on the engine's side);
* a cancel reaches the job on its actor and ends it at the next step;
* an engine killed mid-job fails exactly its running jobs with ``generation_failed``,
  the queued jobs run on the other engine, Ray restarts the killed one, new jobs
  complete; ``/ready`` stays 200 while one engine answers and says ``no engines``
  while none does; ``/metrics`` says which engine is alive;
* a model no engine can load is a failed start that says why; the engines that load
  serve while another still waits for room;
* a job goes to the engine whose running group it can join;
* ``serve --engines 2`` drains on SIGTERM and stops the Ray runtime it started.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from latentcast.protocol import Cancelled, Complete, Error, Progress
from tests.support import open_client, ready_status, wait_for

pytest.importorskip("ray", reason="the Ray engine tests need the latentcast[ray] extra")

PROMPT = "a lighthouse"
#: Long enough to kill or cancel mid-way on any machine, short enough to finish.
SLOW_JOB = {"steps": 150, "width": 128, "height": 128}


@asynccontextmanager
async def ray_server(model_cache: Path, address: str, **options: Any) -> AsyncIterator[Any]:
    """A ready server whose engines are actors on the module's cluster."""
    from latentcast.server.app import Server
    from latentcast.server.config import ServerConfig

    settings: dict[str, Any] = {
        "port": 0,
        "cache_dir": model_cache,
        "drain_timeout": 10.0,
        "cpu_threads": 1,
        "ray_address": address,
        "engines": 2,
    }
    settings.update(options)
    async with Server(ServerConfig(**settings)) as server:
        async with asyncio.timeout(120):
            await server.wait_ready()
            # Both engines, so that every test knows where its jobs can go.
            await wait_for(lambda: len(server.workers) == settings["engines"], timeout=120)
        yield server


def submit(job_id: str, **params: Any) -> dict[str, Any]:
    return {"type": "submit", "id": job_id, "params": {"prompt": PROMPT, **params}}


def metric(server: Any, name: str, engine: str) -> float:
    prefix = f'{name}{{engine="{engine}"}} '
    for line in server.metrics.render().decode().splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    raise AssertionError(f"no {prefix.strip()} in /metrics")


def engine_of(server: Any, job_id: str) -> Any:
    """The worker whose engine runs ``job_id``."""
    for worker in server.workers:
        if any(job.id == job_id for job in worker.running_jobs):
            return worker
    raise AssertionError(f"{job_id} runs on no engine")


async def test_jobs_from_several_sessions_run_on_both_engines_with_the_embedded_bytes(
    ray_cluster: str, model_cache: Path, start_server: Any
) -> None:
    jobs = {f"j{k}": {"steps": 3, "seed": k} for k in range(4)}
    async with ray_server(model_cache, ray_cluster, max_batch=2) as server:
        assert server.model is None, "the front end loads no model"
        clients = [await open_client(server.ws_url) for _ in range(2)]
        assert clients[0].welcome.model.name == "tiny"
        for k, (job_id, params) in enumerate(jobs.items()):
            await clients[k % 2].send(submit(job_id, **params))
        ends = {}
        for k, job_id in enumerate(jobs):
            ends[job_id] = await clients[k % 2].ended(job_id)
        assert all(isinstance(end, Complete) for end in ends.values()), ends
        # max_batch 2: one guided job per engine at a time, so both engines ran jobs.
        for engine in ("ray-0", "ray-1"):
            assert metric(server, "latentcast_engine_steps_total", engine) > 0, engine
            assert metric(server, "latentcast_engine_alive", engine) == 1
        for client in clients:
            await client.close()
    async with start_server(model="tiny") as local:
        client = await open_client(local.ws_url)
        for job_id, params in jobs.items():
            await client.send(submit(job_id, **params))
            end = await client.ended(job_id)
            assert isinstance(end, Complete)
            assert end.images[0].data == ends[job_id].images[0].data, job_id
        await client.close()


async def test_a_cancel_reaches_the_job_on_its_actor(ray_cluster: str, model_cache: Path) -> None:
    async with ray_server(model_cache, ray_cluster, engines=1) as server:
        client = await open_client(server.ws_url)
        await client.send(submit("long", **SLOW_JOB))
        await client.send(submit("short", steps=3, seed=1))
        await client.recv_until(
            lambda m: isinstance(m, Progress) and m.id == "long" and m.step >= 2
        )
        await client.send({"type": "cancel", "id": "long"})
        long_end = await client.ended("long")
        assert isinstance(long_end, Cancelled) and long_end.step < SLOW_JOB["steps"], long_end
        assert isinstance(await client.ended("short"), Complete)
        await client.close()


async def test_a_killed_engine_fails_exactly_its_running_jobs_and_comes_back(
    ray_cluster: str, model_cache: Path
) -> None:
    async with ray_server(model_cache, ray_cluster, max_batch=2) as server:
        http = server.http_url
        client = await open_client(server.ws_url)
        for k in range(4):  # two run (one per engine), two wait
            await client.send(submit(f"j{k}", seed=k, **SLOW_JOB))
        await client.recv_until(
            lambda m: isinstance(m, Progress) and m.id in ("j0", "j1") and m.step >= 2
        )
        await wait_for(lambda: sum(len(w.running_jobs) for w in server.workers) == 2)
        victim = engine_of(server, "j0")
        lost = "j0"
        survivor = "j1"
        assert engine_of(server, survivor) is not victim
        os.kill(victim.engine.pid, signal.SIGKILL)

        lost_end = await client.ended(lost)
        assert isinstance(lost_end, Error) and lost_end.code == "generation_failed", lost_end
        assert f"engine {victim.engine.name} was lost" in lost_end.message
        assert (await asyncio.to_thread(ready_status, http))[0] == 200, "one engine answers"
        for job_id in (survivor, "j2", "j3"):
            try:
                end = await client.ended(job_id)
            except TimeoutError:
                state = [(w.engine.name, w.alive, w.running_jobs) for w in server.workers]
                raise AssertionError(f"{job_id} did not end; engines: {state}") from None
            assert isinstance(end, Complete), (job_id, end)
        # Ray restarts the killed actor; it loads the model again and takes jobs.
        await wait_for(lambda: victim.alive, timeout=120)
        assert metric(server, "latentcast_engine_alive", victim.engine.name) == 1
        await client.send(submit("after", steps=3))
        assert isinstance(await client.ended("after"), Complete)
        await client.close()


async def test_ready_says_no_engines_while_the_only_one_is_lost(
    ray_cluster: str, model_cache: Path
) -> None:
    async with ray_server(model_cache, ray_cluster, engines=1) as server:
        (worker,) = server.workers
        http = server.http_url
        client = await open_client(server.ws_url)
        await client.send(submit("doomed", **SLOW_JOB))
        await client.recv_until(lambda m: isinstance(m, Progress) and m.id == "doomed")
        os.kill(worker.engine.pid, signal.SIGKILL)
        end = await client.ended("doomed")
        assert isinstance(end, Error) and end.code == "generation_failed", end
        status, body = await asyncio.to_thread(ready_status, http)
        assert (status, body.get("reason")) == (503, "no engines"), (status, body)
        assert metric(server, "latentcast_engine_alive", "ray-0") == 0
        # A job accepted meanwhile waits for the engine, and runs once it is back.
        await client.send(submit("patient", steps=3))
        assert isinstance(await client.ended("patient"), Complete)
        assert (await asyncio.to_thread(ready_status, http))[0] == 200
        await client.close()


async def test_a_model_no_engine_can_load_fails_the_start(
    ray_cluster: str, model_cache: Path, tmp_path: Path
) -> None:
    from latentcast.server.app import Server
    from latentcast.server.config import ServerConfig

    missing = tmp_path / "no-such-model"
    config = ServerConfig(
        port=0,
        cache_dir=model_cache,
        cpu_threads=1,
        ray_address=ray_cluster,
        engines=2,
        model=str(missing),
    )
    server = Server(config)
    await server.start()
    try:
        with pytest.raises(Exception) as failure:
            async with asyncio.timeout(120):
                await server.wait_ready()
        assert "no-such-model" in str(failure.value)
        assert server.load_error is not None
    finally:
        await server.close()


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


async def test_serve_engines_drains_on_sigterm_and_stops_the_ray_runtime_it_started(
    model_cache: Path,
) -> None:
    """``latentcast serve --engines 2``: its own local Ray runtime; SIGTERM lets the running
    job finish, the process exits 0 and takes the runtime with it."""
    from tests.integration.test_drain import serve_process

    async with serve_process(model_cache, "--engines", "2", "--cpu-threads", "1") as served:
        session = next(
            match.group(1)
            for line in served.log
            if (match := re.search(r"ray: started a local runtime .*session (session_\S+)\)", line))
        )
        assert _processes_mentioning(session), "no Ray processes of its own"
        client = await open_client(served.url)
        await client.send(submit("last", steps=12, width=128, height=128))
        await client.recv_until(lambda m: isinstance(m, Progress) and m.id == "last")
        served.signal(signal.SIGTERM)
        end = await client.ended("last")
        assert isinstance(end, Complete), end
        status, _ = await served.wait_exit(timeout=60)
        assert status == 0, "".join(served.log[-20:])
    await wait_for(lambda: not _processes_mentioning(session), timeout=30)


async def test_an_engine_that_dies_while_idle_is_noticed_and_comes_back(
    ray_cluster: str, model_cache: Path
) -> None:
    """An idle engine is checked every few seconds: /ready and /metrics know it is gone
    before any job finds out, and know it is back."""
    async with ray_server(model_cache, ray_cluster, engines=1) as server:
        (worker,) = server.workers
        http = server.http_url
        os.kill(worker.engine.pid, signal.SIGKILL)

        async def ready() -> tuple[int, str | None]:
            status, body = await asyncio.to_thread(ready_status, http)
            return status, body.get("reason")

        deadline = time.monotonic() + 30
        while await ready() != (503, "no engines"):
            assert time.monotonic() < deadline, "the dead engine went unnoticed"
            await asyncio.sleep(0.2)
        assert metric(server, "latentcast_engine_alive", "ray-0") == 0
        await wait_for(lambda: worker.alive, timeout=120)
        assert await ready() == (200, None)
        assert metric(server, "latentcast_engine_alive", "ray-0") == 1


async def test_the_first_engine_ready_makes_the_server_ready_while_another_waits(
    ray_cluster: str, model_cache: Path
) -> None:
    """Three engines on a cluster with room for two: the third waits for a CPU slot that
    never comes, and the server serves with the two that loaded (issue 10: an engine that
    is slow to load does not hold up the others)."""
    from latentcast.server.app import Server
    from latentcast.server.config import ServerConfig

    config = ServerConfig(
        port=0, cache_dir=model_cache, cpu_threads=1, ray_address=ray_cluster, engines=3
    )
    async with Server(config) as server:
        async with asyncio.timeout(120):
            await server.wait_ready()
        await wait_for(lambda: len(server.workers) == 2, timeout=120)
        assert (await asyncio.to_thread(ready_status, server.http_url))[0] == 200
        client = await open_client(server.ws_url)
        await client.send(submit("served", steps=3))
        assert isinstance(await client.ended("served"), Complete)
        assert len(server.workers) == 2, "the third engine found no slot"
        await client.close()


async def test_a_job_goes_to_the_engine_whose_running_group_it_can_join(
    ray_cluster: str, model_cache: Path
) -> None:
    """Both engines busy with jobs of different sizes: a job of the first size joins the
    group of that size (a shared UNet call), whichever engine reaches a step boundary
    first. Four placements: by chance all four would come out right one time in 16."""
    long = {"steps": 150, "guidance_scale": 7.5}
    async with ray_server(model_cache, ray_cluster, max_batch=3) as server:
        client = await open_client(server.ws_url)
        await client.send(submit("x", width=128, height=128, **long))
        await client.recv_until(lambda m: isinstance(m, Progress) and m.id == "x")
        await client.send(submit("y", width=192, height=192, **long))
        await client.recv_until(lambda m: isinstance(m, Progress) and m.id == "y")
        home, other = engine_of(server, "x"), engine_of(server, "y")
        assert home is not other, "x and y should run on one engine each"
        for k in range(4):
            job_id = f"z{k}"
            await client.send(submit(job_id, width=128, height=128, steps=150, guidance_scale=1))
            await client.recv_until(lambda m, j=job_id: m.type == "started" and m.id == j)
            assert engine_of(server, job_id) is home, f"{job_id} did not join x's group"
            await client.send({"type": "cancel", "id": job_id})
            assert isinstance(await client.ended(job_id), Cancelled)
        for job_id in ("x", "y"):
            await client.send({"type": "cancel", "id": job_id})
        await client.close()
