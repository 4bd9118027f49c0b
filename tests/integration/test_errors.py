"""Section 6 error codes and section 1 frame rules, over a real socket."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from latentcast.protocol import Error
from tests.support import open_client


async def _error(client) -> Error:
    message = await client.recv(timeout=10)
    assert isinstance(message, Error), message
    return message


#: Tests on the module's shared server (default configuration). Each opens its own
#: connection and leaves no unfinished job, so they do not depend on each other's order.
shared = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(model_cache):
    """One server with the default configuration for every case that needs no other."""
    from latentcast.server.app import Server
    from latentcast.server.config import ServerConfig

    async with Server(ServerConfig(port=0, cache_dir=model_cache, drain_timeout=10.0)) as server:
        await server.wait_ready()
        yield server


@pytest.mark.parametrize(
    "frame",
    [
        "a text frame",
        msgpack.packb({"type": "cancel", "id": "x"}) + b"\x00",  # trailing bytes
        msgpack.packb([1, 2]),  # not a map
        msgpack.packb({1: "x", "type": "cancel"}),  # non-string key
        msgpack.packb({"type": "cancel", "id": msgpack.ExtType(5, b"x")}),  # extension type
        msgpack.packb({"id": "x"}),  # no type
        msgpack.packb({"type": 3, "id": "x"}),  # type not a string
        b"\x82\xa4type",  # truncated
        b"",
    ],
    ids=[
        "text",
        "trailing",
        "array",
        "int-key",
        "ext",
        "no-type",
        "int-type",
        "truncated",
        "empty",
    ],
)
@shared
async def test_bad_frames_get_bad_frame_and_the_connection_stays_open(server, frame) -> None:
    client = await open_client(server.ws_url)
    await client.send(frame)
    error = await _error(client)
    assert (error.code, error.id, error.field) == ("bad_frame", None, None)
    await client.submit("after", steps=1)
    assert (await client.job_messages("after"))[-1].type == "complete"
    await client.close()


@shared
async def test_unknown_type_echoes_the_id(server) -> None:
    client = await open_client(server.ws_url)
    await client.send({"type": "subscribe", "id": "x1"})
    error = await _error(client)
    assert (error.code, error.id) == ("unknown_type", "x1")
    await client.send({"type": "subscribe", "id": 5})
    error = await _error(client)
    assert (error.code, error.id) == ("unknown_type", None)
    await client.close()


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"type": "submit", "id": "j"}, "params"),
        ({"type": "submit", "id": "j", "params": {}}, "params.prompt"),
        ({"type": "submit", "id": "j", "params": {"prompt": None}}, "params.prompt"),
        ({"type": "submit", "id": "j", "params": {"prompt": "x", "width": 100}}, "params.width"),
        ({"type": "submit", "id": "j", "params": {"prompt": "x", "width": 64.0}}, "params.width"),
        ({"type": "submit", "id": "j", "params": {"prompt": "x", "steps": True}}, "params.steps"),
        ({"type": "submit", "id": "j", "params": {"prompt": "x", "steps": "2"}}, "params.steps"),
        ({"type": "submit", "id": "j", "params": {"prompt": "x", "steps": 0}}, "params.steps"),
        ({"type": "submit", "id": "j", "params": {"prompt": "x", "steps": 151}}, "params.steps"),
        ({"type": "submit", "id": "j", "params": {"prompt": "x", "seed": 2**32}}, "params.seed"),
        (
            {"type": "submit", "id": "j", "params": {"prompt": "x", "seed": 2**64 - 1}},
            "params.seed",
        ),
        ({"type": "submit", "id": "j", "params": {"prompt": "x", "seed": -(2**63)}}, "params.seed"),
        (
            {
                "type": "submit",
                "id": "j",
                "params": {"prompt": "x", "guidance_scale": float("nan")},
            },
            "params.guidance_scale",
        ),
        (
            {"type": "submit", "id": "j", "params": {"prompt": "x", "guidance_scale": 31}},
            "params.guidance_scale",
        ),
        (
            {"type": "submit", "id": "j", "params": {"prompt": "x", "scheduler": "nope"}},
            "params.scheduler",
        ),
        (
            {"type": "submit", "id": "j", "params": {"prompt": "x", "strength": 0.5}},
            "params.strength",
        ),
        (
            {"type": "submit", "id": "j", "params": {"prompt": "x", "loras": [{"name": "z"}]}},
            "params.loras.0.name",
        ),
        (
            {"type": "submit", "id": "j", "params": {"prompt": "x", "colour": "red"}},
            "params.colour",
        ),
        (
            {"type": "submit", "id": "j", "params": {"prompt": "x"}, "preview": {"every": 0}},
            "preview.every",
        ),
        (
            {"type": "submit", "id": "j", "params": {"prompt": "x"}, "output": {"quality": 0}},
            "output.quality",
        ),
        ({"type": "submit", "id": "j", "params": {"prompt": "x"}, "replaces": "j"}, "replaces"),
        ({"type": "submit", "id": "bad id!", "params": {"prompt": "x", "width": 1}}, "id"),
        ({"type": "submit", "id": "j", "params": {"prompt": "x"}, "extra": 1}, "extra"),
        ({"type": "cancel"}, "id"),
        ({"type": "cancel", "id": 7}, "id"),
    ],
)
@shared
async def test_invalid_requests_name_the_first_offending_field(server, message, field) -> None:
    client = await open_client(server.ws_url)
    await client.send(message)
    error = await _error(client)
    assert error.code == "invalid_request"
    assert error.field == field
    assert field in error.message
    expected_id = message.get("id") if isinstance(message.get("id"), str) else None
    assert error.id == expected_id
    await client.close()


async def test_prompt_limit_counts_code_points(start_server) -> None:
    async with start_server(max_prompt_chars=3) as server:
        client = await open_client(server.ws_url)
        await client.submit("ok", "🦊🦊🦊", steps=1)
        assert (await client.job_messages("ok"))[-1].type == "complete"
        await client.submit("long", "🦊🦊🦊🦊", steps=1)
        error = await _error(client)
        assert (error.code, error.field) == ("invalid_request", "params.prompt")
        await client.close()


async def test_the_bad_frame_that_reaches_the_limit_is_sent_then_1008(start_server) -> None:
    async with start_server(max_bad_frames=3) as server:
        client = await open_client(server.ws_url)
        await client.send({"type": "nope"})  # unknown_type counts too
        await client.send(b"\xc1")
        await client.send({"type": "submit", "id": "x"})  # invalid_request does not count
        await client.send(b"\xc1")
        codes = [(await _error(client)).code for _ in range(4)]
        assert codes == ["unknown_type", "bad_frame", "invalid_request", "bad_frame"]
        with pytest.raises(ConnectionClosed):
            await client.recv(timeout=10)
        assert client.ws.close_code == 1008


async def test_a_frame_over_max_message_bytes_closes_with_1009(start_server) -> None:
    async with start_server(
        max_message_bytes=1024 * 1024, max_width=256, max_height=256, max_images=1
    ) as server:
        client = await open_client(server.ws_url)
        assert client.welcome.limits.max_message_bytes == 1024 * 1024
        await client.send(b"\x00" * (1024 * 1024 + 1))
        with pytest.raises(ConnectionClosed):
            await client.recv(timeout=10)
        assert client.ws.close_code == 1009


async def test_job_level_errors(start_server) -> None:
    async with start_server(max_jobs_per_session=2, max_queue=3) as server:
        client = await open_client(server.ws_url)
        await client.submit("a", steps=50)
        await client.submit("a", steps=1)
        await client.submit("b", steps=50)
        await client.submit("c", steps=1)
        await client.send({"type": "cancel", "id": "zzz"})
        await client.send(
            {"type": "submit", "id": "img", "params": {"prompt": "x", "init_image": b"\x89PNG"}}
        )
        answers = await client.recv_until(lambda m: m.type == "error" and m.id == "img")
        errors = {m.id: m.code for m in answers if m.type == "error"}
        assert errors == {
            "a": "duplicate_id",
            "c": "too_many_jobs",
            "zzz": "unknown_job",
            "img": "bad_image",
        }
        await client.close()


async def test_queue_full_counts_only_waiting_jobs(start_server) -> None:
    async with start_server(max_queue=2) as server:
        client = await open_client(server.ws_url)
        await client.submit("run", steps=100)
        await client.recv_until(lambda m: m.type == "started")
        await client.submit("w1", steps=1)
        await client.submit("w2", steps=1)
        await client.submit("w3", steps=1)
        answers = await client.recv_until(
            lambda m: getattr(m, "id", None) == "w3" and m.type in ("accepted", "error")
        )
        kinds = {
            m.id: (m.type, getattr(m, "code", None))
            for m in answers
            if m.type in ("accepted", "error")
        }
        assert kinds == {
            "w1": ("accepted", None),
            "w2": ("accepted", None),
            "w3": ("error", "queue_full"),
        }
        await client.close()


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    frames=st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.recursive(
                st.none()
                | st.booleans()
                | st.integers(-(2**63), 2**64 - 1)
                | st.floats()
                | st.text(max_size=8)
                | st.binary(max_size=8),
                lambda children: (
                    st.lists(children, max_size=4)
                    | st.dictionaries(
                        st.sampled_from(["type", "id", "params", "prompt", "steps", "x"])
                        | st.text(max_size=4),
                        children,
                        max_size=4,
                    )
                ),
                max_leaves=12,
            ).map(lambda value: msgpack.packb(value, use_bin_type=True)),
            st.fixed_dictionaries(
                {"type": st.sampled_from(["submit", "cancel"]), "id": st.text(max_size=70)},
                optional={
                    "params": st.dictionaries(
                        st.sampled_from(
                            [
                                "prompt",
                                "width",
                                "height",
                                "steps",
                                "seed",
                                "guidance_scale",
                                "num_images",
                            ]
                        ),
                        st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=4),
                        max_size=4,
                    )
                },
            ).map(lambda value: msgpack.packb(value, use_bin_type=True)),
            # Valid submits (also replacing or duplicating one another) and cancels of
            # them, so that accepted jobs are fuzzed too, not only refusals.
            st.fixed_dictionaries(
                {
                    "type": st.just("submit"),
                    "id": st.sampled_from(["f1", "f2", "v"]),
                    "params": st.fixed_dictionaries(
                        {"prompt": st.text(max_size=8)},
                        optional={
                            "steps": st.integers(1, 3),
                            "width": st.sampled_from([64, 128]),
                            "seed": st.integers(0, 2**32 - 1),
                        },
                    ),
                },
                optional={"replaces": st.sampled_from(["f1", "f2"])},
            ).map(lambda value: msgpack.packb(value, use_bin_type=True)),
            st.fixed_dictionaries(
                {"type": st.just("cancel"), "id": st.sampled_from(["f1", "f2"])}
            ).map(lambda value: msgpack.packb(value, use_bin_type=True)),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_arbitrary_frames_never_crash_the_server_or_disturb_others(shared_server, frames) -> None:
    server, loop = shared_server

    async def scenario() -> None:
        victim = await open_client(server.ws_url)
        fuzzer = await open_client(server.ws_url)
        await victim.submit("v", steps=2, seed=1)
        for frame in frames:
            await fuzzer.send(frame)
        # Every frame is handled in order; a generated valid submit may also start a job.
        await fuzzer.send({"type": "cancel", "id": "end-marker"})
        answers = await fuzzer.recv_until(
            lambda m: m.type == "error" and m.id == "end-marker", timeout=30
        )
        assert answers[-1].code == "unknown_job"
        # No frame made the session fail inside (which answers with an `internal` error).
        assert [m for m in answers if m.type == "error" and m.code == "internal"] == []
        assert (await victim.job_messages("v"))[-1].type == "complete"
        await victim.close()
        await fuzzer.close()

    loop.run_until_complete(scenario())


@pytest.fixture(scope="module")
def shared_server(model_cache):
    """One server for the many examples of the fuzz test (started once, on its own loop)."""
    from latentcast.server.app import Server
    from latentcast.server.config import ServerConfig

    loop = asyncio.new_event_loop()
    server = Server(
        ServerConfig(
            port=0,
            cache_dir=model_cache,
            max_width=128,
            max_height=128,
            max_steps=3,
            max_images=1,
            max_bad_frames=1000,
        )
    )
    loop.run_until_complete(server.start())
    loop.run_until_complete(server.wait_ready())
    yield server, loop
    loop.run_until_complete(server.drain())
    loop.run_until_complete(server.close())
    loop.close()
