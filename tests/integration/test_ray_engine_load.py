"""One Ray engine unable to load its model while another loads (issue 10, item 5).

A real multi-machine fault, made on this machine: a cluster of two Ray nodes (the
``two_node_ray_cluster`` fixture, ``ray start`` as an operator runs it), each node with
an environment of its own, as two machines have. The server's model is a Hugging Face hub
id, offline (``HF_HUB_OFFLINE=1`` on both nodes): the head node's ``HF_HOME`` has it in
its hub cache, the worker node's is empty, as on a machine where nobody downloaded it.
Each engine takes one CPU slot and each node has one, so one engine lands on each node,
and the one on the worker node cannot load. What must hold:

* the server is ready once the head's engine has loaded, and clients' jobs complete on it;
* the other engine is left out: ``/metrics`` says it is not alive, the log says why (the
  model is not in that node's Hugging Face cache), the start is not a failed one;
* its actor is ended, not restarted over and over by Ray (``max_restarts=-1``);
* an engine that loaded, lost, and restarted where the model is gone says why once, stays
  lost (not restarted in a loop) and ``/ready`` says ``no engines``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from latentcast.protocol import Complete
from tests.integration.test_ray_engines import metric, submit
from tests.support import open_client, ready_status, wait_for

pytest.importorskip("ray", reason="the Ray engine tests need the latentcast[ray] extra")

#: The hub id the model goes by; in the head node's hub cache only.
HUB_ID = "latentcast-test/tiny"


def hub_cache_with_tiny_model(hf_home: Path, tiny_folder: Path) -> None:
    """``HF_HOME`` whose hub cache has the tiny model under :data:`HUB_ID`, in the layout
    ``huggingface_hub`` writes (``refs/main`` names the snapshot a download fetched)."""
    repo = hf_home / "hub" / ("models--" + HUB_ID.replace("/", "--"))
    commit = hashlib.sha1(tiny_folder.name.encode()).hexdigest()
    shutil.copytree(tiny_folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


class HalfCachedCluster(NamedTuple):
    address: str
    #: The nodes' ``HF_HOME``: the head's has the model, the worker's does not.
    head_home: Path
    worker_home: Path


@pytest.fixture(scope="module")
def half_cached_cluster(
    tmp_path_factory: pytest.TempPathFactory, model_cache: Path
) -> Iterator[HalfCachedCluster]:
    """Two nodes, the model in the head's Hugging Face cache and not in the worker's."""
    from latentcast.server.models import tiny_model_dir
    from tests.fixtures.ray_cluster import two_node_ray_cluster

    root = tmp_path_factory.mktemp("two-nodes")
    head_home, worker_home = root / "hf-head", root / "hf-worker"
    hub_cache_with_tiny_model(head_home, tiny_model_dir(model_cache))
    worker_home.mkdir()
    offline = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with two_node_ray_cluster(
        root,
        head_env={**offline, "HF_HOME": str(head_home)},
        worker_env={**offline, "HF_HOME": str(worker_home)},
    ) as address:
        yield HalfCachedCluster(address, head_home, worker_home)


def _engine_actor_homes() -> list[str]:
    """``HF_HOME`` of every engine actor process on this machine (its node's)."""
    homes = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "cmdline").read_bytes().startswith(b"ray::EngineActor"):
                continue
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        homes += [
            item.decode()[len("HF_HOME=") :] for item in environ if item.startswith(b"HF_HOME=")
        ]
    return homes


@asynccontextmanager
async def half_served(
    cluster: HalfCachedCluster, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> AsyncIterator[tuple[Any, Any, str]]:
    """A server with two engines on ``cluster``, once the one on the worker node has
    failed: (the server, the worker of the engine that loaded, the other engine's name)."""
    from latentcast.server.app import Server
    from latentcast.server.config import ServerConfig

    caplog.set_level(logging.INFO, logger="latentcast")
    config = ServerConfig(
        port=0,
        cache_dir=model_cache,
        cpu_threads=1,
        ray_address=cluster.address,
        engines=2,
        model=HUB_ID,
    )
    async with Server(config) as server:
        async with asyncio.timeout(120):
            await server.wait_ready()
        await wait_for(lambda: "an engine could not start" in caplog.text, timeout=120)
        (worker,) = server.workers
        (lost,) = {"ray-0", "ray-1"} - {worker.engine.name}
        yield server, worker, lost


def _messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [record.getMessage() for record in caplog.records if text in record.getMessage()]


async def test_an_engine_that_cannot_load_is_left_out_and_the_other_serves(
    half_cached_cluster: HalfCachedCluster, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with half_served(half_cached_cluster, model_cache, caplog) as (server, worker, lost):
        assert server.load_error is None, "one engine loaded: not a failed start"
        failures = _messages(caplog, "could not start")
        assert len(failures) == 1, failures
        assert f"engine {lost} could not start" in failures[0]
        assert "not in the local Hugging Face cache" in failures[0], failures[0]
        assert (await asyncio.to_thread(ready_status, server.http_url))[0] == 200
        assert metric(server, "latentcast_engine_alive", worker.engine.name) == 1
        assert metric(server, "latentcast_engine_alive", lost) == 0

        clients = [await open_client(server.ws_url) for _ in range(2)]
        assert clients[0].welcome.model.name == HUB_ID
        for k, client in enumerate(clients):
            await client.send(submit(f"j{k}", steps=3, seed=k))
        for k, client in enumerate(clients):
            assert isinstance(await client.ended(f"j{k}"), Complete)
            await client.close()
        assert metric(server, "latentcast_engine_steps_total", worker.engine.name) > 0
        assert server.workers == (worker,), "the engine that could not load stays out"
        assert metric(server, "latentcast_engine_alive", lost) == 0
        # Its actor was ended, not restarted: no engine process on the worker node.
        worker_home = str(half_cached_cluster.worker_home)
        await wait_for(lambda: worker_home not in _engine_actor_homes(), timeout=30)
        assert str(half_cached_cluster.head_home) in _engine_actor_homes()


async def test_an_engine_restarted_where_the_model_is_gone_says_why_once_and_stays_lost(
    half_cached_cluster: HalfCachedCluster, model_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The head's cache loses the model after its engine loaded, then the engine dies: Ray
    restarts the actor, whose load fails on whichever node it lands. The front end says
    why once; the actor is not restarted again and again (Ray does not restart an actor
    whose constructor raised), and ``/ready`` says there are no engines."""
    cached = half_cached_cluster.head_home / "hub"
    away = cached.with_name("hub-away")
    async with half_served(half_cached_cluster, model_cache, caplog) as (server, worker, lost):
        cached.rename(away)
        try:
            os.kill(worker.engine.pid, signal.SIGKILL)
            name = worker.engine.name
            said = f"engine {name} is not back"
            await wait_for(
                lambda: any("Hugging Face cache" in m for m in _messages(caplog, said)),
                timeout=120,
            )
            status, body = await asyncio.to_thread(ready_status, server.http_url)
            assert (status, body.get("reason")) == (503, "no engines"), (status, body)
            assert metric(server, "latentcast_engine_alive", name) == 0
            assert metric(server, "latentcast_engine_alive", lost) == 0
            # Room for a restart loop to show: the front end keeps asking once a second.
            await asyncio.sleep(3)
            reasons = [m for m in _messages(caplog, said) if "Hugging Face cache" in m]
            assert len(reasons) == 1, reasons
            homes = {str(half_cached_cluster.head_home), str(half_cached_cluster.worker_home)}
            assert not homes & set(_engine_actor_homes()), "not restarted again"
            assert not worker.alive
        finally:
            away.rename(cached)
