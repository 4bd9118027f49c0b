"""Fixtures shared by every test: a tiny model built once per run, and real servers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
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


@pytest.fixture
def start_server(model_cache: Path) -> ServerFactory:
    """``async with start_server(max_queue=2) as server:`` a ready server on 127.0.0.1.

    Its engine gets one torch thread unless a test says otherwise: the tests run their
    clients (and the server's event loop) in the same process on a 2-core machine, and
    fixtures and comparisons run torch on threads of their own. With more OpenMP threads
    than cores libgomp stops spin-waiting, so torch's default of a thread per core can
    make a 0.1 s job take seconds here. (A server process keeps torch to the engine
    thread; the default thread count is measured in bench/bench_batching.py.)
    """
    from latentcast.server.app import Server
    from latentcast.server.config import ServerConfig

    @asynccontextmanager
    async def start(**overrides: Any) -> AsyncIterator[Server]:
        options: dict[str, Any] = {
            "port": 0,
            "cache_dir": model_cache,
            "drain_timeout": 10.0,
            "cpu_threads": 1,
        }
        options.update(overrides)
        async with Server(ServerConfig(**options)) as server:
            await server.wait_ready()
            yield server

    return start
