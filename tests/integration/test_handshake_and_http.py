"""Handshake checks (401, 403, 503, in that order) and the HTTP endpoints (section 8)."""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.error
import urllib.request

import pytest
from websockets.exceptions import InvalidStatus

from tests.support import open_client


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(), dict(error.headers)


async def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    return await asyncio.to_thread(_get, url, headers)


async def _refused(url: str, **connect_args) -> int:
    with pytest.raises(InvalidStatus) as refused:
        await open_client(url, **connect_args)
    return refused.value.response.status_code


async def test_health_ready_metrics_and_index(start_server) -> None:
    async with start_server() as server:
        status, body, _ = await get(server.http_url + "/health")
        assert (status, json.loads(body)) == (200, {"status": "ok"})
        status, body, _ = await get(server.http_url + "/ready")
        assert (status, json.loads(body)) == (200, {"ready": True})
        client = await open_client(server.ws_url)
        await client.submit("j", steps=1)
        await client.job_messages("j")
        status, body, headers = await get(server.http_url + "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        for name in (
            "latentcast_connections 1.0",
            "latentcast_queue_depth 0.0",
            'latentcast_jobs_total{outcome="complete"} 1.0',
            "latentcast_step_seconds_count",
            "latentcast_job_seconds_count 1.0",
        ):
            assert name in body, name
        status, body, headers = await get(server.http_url + "/")
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        assert (await get(server.http_url + "/nope"))[0] == 404
        await client.close()


async def test_tokens_by_header_or_query_and_401_without(start_server) -> None:
    async with start_server(tokens=("s3cret", "other")) as server:
        assert await _refused(server.ws_url) == 401
        assert await _refused(server.ws_url + "?token=wrong") == 401
        assert (
            await _refused(server.ws_url, additional_headers={"Authorization": "Bearer nope"})
            == 401
        )
        by_query = await open_client(server.ws_url + "?token=s3cret")
        by_header = await open_client(
            server.ws_url, additional_headers={"Authorization": "Bearer other"}
        )
        await by_query.close()
        await by_header.close()
        assert (await get(server.http_url + "/metrics"))[0] == 401
        assert (await get(server.http_url + "/metrics?token=s3cret"))[0] == 200
        headers = {"Authorization": "Bearer s3cret"}
        assert (await get(server.http_url + "/metrics", headers))[0] == 200
        # /health and /ready stay open for load balancers and orchestrators.
        assert (await get(server.http_url + "/health"))[0] == 200
        assert (await get(server.http_url + "/ready"))[0] == 200


async def test_tokens_are_never_logged(start_server, caplog) -> None:
    # Everything latentcast logs, at its most verbose, and websockets at INFO (the CLI keeps
    # it at WARNING: at DEBUG that library prints raw request lines).
    caplog.set_level("DEBUG", logger="latentcast")
    caplog.set_level("INFO", logger="websockets")
    async with start_server(tokens=("s3cret-value",)) as server:
        await _refused(server.ws_url + "?token=wrong-value")
        client = await open_client(server.ws_url + "?token=s3cret-value")
        await client.close()
    assert "s3cret-value" not in caplog.text
    assert "wrong-value" not in caplog.text


async def test_origins_are_checked_after_tokens(start_server) -> None:
    allowed = "https://app.example"
    async with start_server(tokens=("t",), allow_origins=(allowed,)) as server:
        url = server.ws_url + "?token=t"
        assert await _refused(url, origin="https://evil.example") == 403
        assert await _refused(url, origin="https://app.example:8443") == 403
        # 401 comes before 403.
        assert await _refused(server.ws_url, origin="https://evil.example") == 401
        good = await open_client(url, origin=allowed)
        no_origin = await open_client(url)  # non-browser clients send none
        await good.close()
        await no_origin.close()


async def test_every_origin_is_allowed_when_none_are_configured(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url, origin="https://anything.example")
        await client.close()


async def test_connection_limit_answers_503(start_server) -> None:
    async with start_server(max_connections=2) as server:
        first = await open_client(server.ws_url)
        second = await open_client(server.ws_url)
        assert await _refused(server.ws_url) == 503
        await first.close()
        await asyncio.sleep(0.2)
        third = await open_client(server.ws_url)
        await second.close()
        await third.close()


async def test_503_before_the_model_is_loaded_and_401_comes_first(model_cache) -> None:
    from latentcast.server.app import Server
    from latentcast.server.config import ServerConfig

    server = Server(ServerConfig(port=0, cache_dir=model_cache, tokens=("t",)))
    # Keep the engine thread busy, so that the model load queued behind it has to wait.
    release = threading.Event()
    hold = asyncio.ensure_future(server.engine_thread.call(release.wait))
    await server.start()
    try:
        status, body, _ = await get(server.http_url + "/ready")
        assert (status, json.loads(body)) == (503, {"ready": False, "reason": "loading"})
        assert (await get(server.http_url + "/health"))[0] == 200
        assert await _refused(server.ws_url) == 401
        assert await _refused(server.ws_url + "?token=t") == 503
    finally:
        release.set()
        await hold
        await server.wait_ready()
        await server.drain()
        await server.close()
    assert server.phase.value == "closed"


async def test_no_permessage_deflate(start_server) -> None:
    async with start_server() as server:
        client = await open_client(server.ws_url)
        extensions = client.ws.response.headers.get("Sec-WebSocket-Extensions")
        assert extensions is None
        await client.close()
