"""Fixtures shared by every test: a tiny model built once per run, and real servers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder per test run, where the tiny model is built once."""
    from latentcast.server.models import tiny_model_dir

    cache = tmp_path_factory.mktemp("latentcast-cache")
    tiny_model_dir(cache)
    return cache


ServerFactory = Callable[..., AbstractAsyncContextManager[Any]]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a real local Ray cluster (2 CPUs), started on first use."""
    pytest.importorskip("ray", reason="the Ray engine tests need the latentcast[ray] extra")
    from tests.fixtures.ray_cluster import local_ray_cluster

    with local_ray_cluster(tmp_path_factory.mktemp("ray") / "ray-start.log") as address:
        yield address


#: Engine kinds a ``@pytest.mark.both_engines`` test runs against.
ENGINE_KINDS = ("embedded", "ray")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``@pytest.mark.both_engines``: run the test once per engine kind (``engine_kind``)."""
    if metafunc.definition.get_closest_marker("both_engines") is not None:
        metafunc.parametrize("engine_kind", ENGINE_KINDS)


@pytest.fixture
def engine_kind() -> str:
    """The engine kind of ``start_server``'s servers: the embedded one unless the test is
    marked ``both_engines``."""
    return "embedded"


@pytest.fixture
def start_server(
    model_cache: Path, engine_kind: str, request: pytest.FixtureRequest
) -> ServerFactory:
    """``async with start_server(max_queue=2) as server:`` a ready server on 127.0.0.1.

    Its engine gets one torch thread unless a test says otherwise: the tests run their
    clients (and the server's event loop) in the same process on a 2-core machine, and
    fixtures and comparisons run torch on threads of their own. With more OpenMP threads
    than cores libgomp stops spin-waiting, so torch's default of a thread per core can
    make a 0.1 s job take seconds here. (A server process keeps torch to the engine
    thread; the default thread count is measured in bench/bench_batching.py.)

    With ``engine_kind`` "ray" (tests marked ``both_engines``) the engines are Ray actors
    on the session's local cluster instead: two, as ``serve --engines 2``, or one when the
    test runs one job at a time (``max_batch=1``), whose premise is that a second job
    waits.
    """
    from latentcast.server.app import Server
    from latentcast.server.config import ServerConfig
    from tests.support import wait_for

    address = request.getfixturevalue("ray_cluster") if engine_kind == "ray" else None

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Server]:
        options: dict[str, Any] = {
            "port": 0,
            "cache_dir": model_cache,
            "drain_timeout": 10.0,
            "cpu_threads": 1,
        }
        options.update(overrides)
        if address is not None:
            # Two engines, as `serve --engines 2`; one for a test whose premise is one
            # job at a time (--max-batch 1: a second job waits in the queue).
            options.update(ray_address=address, engines=1 if options.get("max_batch") == 1 else 2)
        async with Server(ServerConfig(**options)) as server:
            await server.wait_ready()
            await wait_for(lambda: len(server.workers) == max(1, options.get("engines", 0)))
            yield server

    return start
