"""Unit tests for latentcast.protocol.codec: framing, round trips and error classification."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from latentcast.protocol import (
    FRAME_ERROR_CODES,
    PROTOCOL_VERSION,
    Accepted,
    BadFrame,
    Cancel,
    Cancelled,
    Complete,
    Defaults,
    Draining,
    Error,
    ErrorCode,
    GenerationParams,
    ImagePreview,
    ImageResult,
    InvalidRequest,
    LatentPreview,
    LatentRGBInfo,
    Limits,
    LoraRef,
    ModelInfo,
    OutputRequest,
    PreviewRequest,
    Progress,
    ProtocolError,
    Queued,
    Started,
    Submit,
    SubmitRules,
    Timings,
    UnknownType,
    Welcome,
    decode_client_message,
    decode_server_message,
    encode_message,
    unpack_frame,
)

REPO = Path(__file__).resolve().parents[3]

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Generating nested garbage is the slow part; fewer examples keep the file fast.
FUZZ_SETTINGS = settings(SETTINGS, max_examples=120)

SCHEDULERS = ("euler", "ddim", "dpm++_2m")
LORAS = ("detail", "style.v2", "x:y")
RULES = SubmitRules(
    limits=Limits(
        max_width=2048,
        max_height=1024,
        max_steps=150,
        max_images=4,
        max_prompt_chars=40,
    ),
    schedulers=SCHEDULERS,
    loras=LORAS,
)

INT64_MIN = -(2**63)
UINT64_MAX = 2**64 - 1


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def decode_error(data: bytes | str, rules: SubmitRules | None = RULES) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        decode_client_message(data, rules)
    return info.value


# --------------------------------------------------------------------------- strategies

job_ids = st.from_regex(r"\A[A-Za-z0-9._:-]{1,64}\Z")
sides = st.integers(8, 2048 // 8).map(lambda n: n * 8)
heights = st.integers(8, 1024 // 8).map(lambda n: n * 8)
images = st.binary(min_size=1, max_size=64)
prompts = st.text(max_size=40)


@st.composite
def generation_params(draw: st.DrawFn) -> GenerationParams:
    values: dict[str, Any] = {"prompt": draw(prompts)}
    optional: dict[str, st.SearchStrategy[Any]] = {
        "negative_prompt": prompts,
        "width": sides,
        "height": heights,
        "steps": st.integers(1, 150),
        "guidance_scale": st.floats(0.0, 30.0),
        "seed": st.integers(0, 2**32 - 1),
        "scheduler": st.sampled_from(SCHEDULERS),
        "num_images": st.integers(1, 4),
        "loras": st.lists(
            st.builds(
                LoraRef,
                name=st.sampled_from(LORAS),
                scale=st.floats(-10.0, 10.0),
            ),
            max_size=3,
        ),
    }
    for key, strategy in optional.items():
        if draw(st.booleans()):
            values[key] = draw(strategy)
    if draw(st.booleans()):
        values["init_image"] = draw(images)
        if draw(st.booleans()):
            values["strength"] = draw(st.floats(0.0, 1.0, exclude_min=True))
        if draw(st.booleans()):
            values["mask"] = draw(images)
    return GenerationParams(**values)


preview_requests = st.builds(
    PreviewRequest,
    kind=st.sampled_from(["none", "latent", "image"]),
    every=st.integers(1, 2**63 - 1),
    format=st.sampled_from(["jpeg", "webp"]),
    max_side=st.none() | st.integers(8, 2**63 - 1),
)
output_requests = st.builds(
    OutputRequest,
    format=st.sampled_from(["png", "jpeg", "webp"]),
    quality=st.integers(1, 100),
)


@st.composite
def submits(draw: st.DrawFn) -> Submit:
    job_id = draw(job_ids)
    values: dict[str, Any] = {"id": job_id, "params": draw(generation_params())}
    if draw(st.booleans()):
        values["preview"] = draw(preview_requests)
    if draw(st.booleans()):
        values["output"] = draw(output_requests)
    if draw(st.booleans()):
        values["replaces"] = draw(job_ids.filter(lambda other: other != job_id))
    return Submit(**values)


client_messages = submits() | st.builds(Cancel, id=job_ids)

ints = st.integers(INT64_MIN, UINT64_MAX)
texts = st.text(max_size=20)
floats = st.floats(allow_nan=False)
rgb = st.tuples(floats, floats, floats)

model_infos = st.builds(
    ModelInfo,
    name=texts,
    family=texts,
    modes=st.lists(texts, max_size=3),
    schedulers=st.lists(texts, max_size=3),
    loras=st.lists(texts, max_size=3),
    latent_channels=ints,
    vae_scale_factor=ints,
    latent_rgb=st.none() | st.builds(LatentRGBInfo, factors=st.lists(rgb, max_size=4), bias=rgb),
)
welcomes = st.builds(
    Welcome,
    protocol=ints,
    server=texts,
    session=texts,
    model=model_infos,
    limits=st.builds(
        Limits,
        max_width=st.integers(64, 2**40),
        max_height=st.integers(64, 2**40),
        max_steps=st.integers(1, 2**40),
        max_images=st.integers(1, 2**40),
        max_prompt_chars=st.integers(0, 2**40),
        max_jobs_per_session=st.integers(1, 2**40),
        max_message_bytes=st.integers(1024, 2**40),
        max_bad_frames=st.integers(1, 2**40),
    ),
    defaults=st.builds(
        Defaults,
        width=ints,
        height=ints,
        steps=ints,
        guidance_scale=floats,
        scheduler=texts,
    ),
)

server_messages: st.SearchStrategy[BaseModel] = st.one_of(
    welcomes,
    st.builds(Accepted, id=texts, position=ints),
    st.builds(Queued, id=texts, position=ints),
    st.builds(Started, id=texts, seed=ints, steps=ints, width=ints, height=ints),
    st.builds(Progress, id=texts, step=ints, steps=ints, elapsed_ms=ints),
    st.builds(
        LatentPreview,
        id=texts,
        step=ints,
        shape=st.tuples(ints, ints, ints),
        data=st.binary(max_size=64),
    ),
    st.builds(
        ImagePreview,
        id=texts,
        step=ints,
        format=st.sampled_from(["jpeg", "webp"]),
        width=ints,
        height=ints,
        data=st.binary(max_size=64),
    ),
    st.builds(
        Complete,
        id=texts,
        images=st.lists(
            st.builds(
                ImageResult,
                data=st.binary(max_size=32),
                format=st.sampled_from(["png", "jpeg", "webp"]),
                width=ints,
                height=ints,
                seed=ints,
            ),
            max_size=3,
        ),
        timings=st.builds(Timings, queued_ms=ints, run_ms=ints),
    ),
    st.builds(
        Cancelled,
        id=texts,
        step=ints,
        reason=st.sampled_from(["client", "replaced", "disconnect"]),
    ),
    st.builds(
        Error,
        id=st.none() | texts,
        code=st.sampled_from([code.value for code in ErrorCode]),
        message=texts,
        field=st.none() | texts,
    ),
    st.builds(Draining, deadline_ms=ints),
)

# Anything msgpack can carry: nil, booleans, 64-bit ints, floats (nan and inf included),
# strings, bin, arrays and maps with keys of any of those scalar kinds.
scalars = st.one_of(
    st.none(),
    st.booleans(),
    ints,
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.binary(max_size=12),
)
any_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(scalars, children, max_size=4)
    ),
    max_leaves=20,
)
param_keys = st.sampled_from(
    [
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "seed",
        "scheduler",
        "num_images",
        "init_image",
        "strength",
        "mask",
        "loras",
        "bogus",
    ]
)
# Maps shaped like client messages, with arbitrary values where the fields go, so that the
# validator (not only the frame checks) sees garbage.
message_like = st.fixed_dictionaries(
    {"type": st.sampled_from(["submit", "cancel", "nope"]) | any_values},
    optional={
        "id": job_ids | any_values,
        "params": st.dictionaries(param_keys, any_values, max_size=5) | any_values,
        "preview": st.dictionaries(
            st.sampled_from(["kind", "every", "format", "max_side", "x"]), any_values
        )
        | any_values,
        "output": st.dictionaries(st.sampled_from(["format", "quality", "x"]), any_values)
        | any_values,
        "replaces": job_ids | any_values,
        "extra": any_values,
    },
)

CLIENT_ERROR_CODES = {ErrorCode.BAD_FRAME, ErrorCode.UNKNOWN_TYPE, ErrorCode.INVALID_REQUEST}


def check_protocol_error(error: ProtocolError, value: object) -> None:
    """What every rejection must look like, whatever the input."""
    assert error.code in CLIENT_ERROR_CODES
    assert isinstance(error.message, str) and error.message
    expected_class = {
        ErrorCode.BAD_FRAME: BadFrame,
        ErrorCode.UNKNOWN_TYPE: UnknownType,
        ErrorCode.INVALID_REQUEST: InvalidRequest,
    }[error.code]
    assert type(error) is expected_class
    if error.code is ErrorCode.BAD_FRAME:
        assert error.id is None
        assert error.field is None
        return
    assert isinstance(value, dict)
    raw_id = value.get("id")
    assert error.id == (raw_id if isinstance(raw_id, str) else None)
    if error.code is ErrorCode.INVALID_REQUEST:
        assert isinstance(error.field, str) and error.field
        assert error.message.startswith(error.field)
    else:
        assert error.field is None


# --------------------------------------------------------------------------- round trips


@SETTINGS
@given(client_messages)
def test_client_message_round_trip_with_rules(message: Submit | Cancel) -> None:
    decoded = decode_client_message(encode_message(message), RULES)
    assert type(decoded) is type(message)
    assert decoded == message


@FUZZ_SETTINGS
@given(client_messages)
def test_client_message_round_trip_without_rules(message: Submit | Cancel) -> None:
    assert decode_client_message(encode_message(message)) == message


@SETTINGS
@given(server_messages)
def test_server_message_round_trip(message: BaseModel) -> None:
    decoded = decode_server_message(encode_message(message))
    assert type(decoded) is type(message)
    assert decoded == message


@SETTINGS
@given(server_messages, st.dictionaries(st.text(max_size=8), scalars, min_size=1, max_size=3))
def test_server_decode_ignores_unknown_keys(message: BaseModel, extra: dict[str, Any]) -> None:
    payload = unpack(encode_message(message))
    extra = {key: value for key, value in extra.items() if key not in payload}
    payload.update(extra)
    assert decode_server_message(pack(payload)) == message


def test_server_decode_ignores_unknown_nested_keys() -> None:
    complete = Complete(
        id="j",
        images=[ImageResult(data=b"\x89PNG", format="png", width=8, height=8, seed=3)],
        timings=Timings(queued_ms=1, run_ms=2),
    )
    payload = unpack(encode_message(complete))
    payload["images"][0]["colorspace"] = "srgb"
    payload["timings"]["decode_ms"] = 5
    payload["future"] = {"anything": [1, 2]}
    assert decode_server_message(pack(payload)) == complete


# --------------------------------------------------------------------------- fuzzing


@SETTINGS
@given(st.binary(max_size=256))
def test_arbitrary_bytes_only_raise_protocol_errors(data: bytes) -> None:
    try:
        message = decode_client_message(data, RULES)
    except ProtocolError as error:
        # Only a frame that is one map with a string type gets past bad_frame.
        value = None if error.code is ErrorCode.BAD_FRAME else unpack(data)
        check_protocol_error(error, value)
    else:
        assert isinstance(message, Submit | Cancel)


@FUZZ_SETTINGS
@given(any_values | message_like)
def test_arbitrary_values_only_raise_protocol_errors(value: Any) -> None:
    for rules in (RULES, None):
        try:
            message = decode_client_message(pack(value), rules)
        except ProtocolError as error:
            check_protocol_error(error, value)
        else:
            assert isinstance(message, Submit | Cancel)
            assert isinstance(value, dict) and value["type"] in ("submit", "cancel")


@FUZZ_SETTINGS
@given(any_values | message_like)
def test_server_decoder_raises_only_bad_frame(value: Any) -> None:
    try:
        decode_server_message(pack(value))
    except ProtocolError as error:
        assert type(error) is BadFrame
        assert error.id is None


# --------------------------------------------------------------------------- bad_frame

VALID_CANCEL = {"type": "cancel", "id": "job-1"}


def bad_frame_cases() -> list[tuple[str, bytes | str]]:
    valid = pack(VALID_CANCEL)
    nested = b"\x82" + pack("type") + pack("submit") + pack("x") + b"\x91" * 200 + b"\xc0"
    return [
        ("text frame", "\x83\xa4type\xa6cancel"),
        ("text frame of json", '{"type": "cancel", "id": "a"}'),
        ("empty", b""),
        ("trailing bytes", valid + b"\xc0"),
        ("two values", valid + valid),
        ("truncated", valid[:-1]),
        ("truncated header", b"\x82"),
        ("truncated bin", b"\xc4\x10abc"),
        ("array", pack(["cancel", "a"])),
        ("string", pack("cancel")),
        ("nil", pack(None)),
        ("integer", pack(7)),
        ("bin", pack(b"\x81\xa4type")),
        ("integer key", pack({"type": "cancel", "id": "a", 1: 2})),
        ("nil key", pack({None: 1, "type": "cancel"})),
        ("bin key", pack({b"type": "cancel", "id": "a"})),
        ("float key", pack({"type": "cancel", 1.5: "a"})),
        ("bool key", pack({"type": "cancel", True: "a"})),
        (
            "nested bytes key",
            pack({"type": "submit", "id": "a", "params": {b"prompt": "x"}}),
        ),
        (
            "nested int key in list",
            pack({"type": "submit", "id": "a", "params": {"prompt": "x", "loras": [{1: "a"}]}}),
        ),
        ("array key", b"\x82" + pack("type") + pack("cancel") + b"\x91\x01" + pack("a")),
        ("map key", b"\x82" + pack("type") + pack("cancel") + b"\x81\x01\x01" + pack("a")),
        ("extension value", pack({"type": "cancel", "id": msgpack.ExtType(5, b"a")})),
        (
            "nested extension",
            pack({"type": "submit", "id": "a", "params": {"prompt": msgpack.ExtType(1, b"")}}),
        ),
        ("timestamp extension", pack({"type": "cancel", "id": "a", "t": msgpack.Timestamp(1)})),
        ("timestamp prompt", pack({"type": "submit", "params": {"prompt": msgpack.Timestamp(0)}})),
        ("extension top level", pack(msgpack.ExtType(3, b"xyz"))),
        ("no type", pack({"id": "a"})),
        ("nil type", pack({"type": None, "id": "a"})),
        ("integer type", pack({"type": 1, "id": "a"})),
        ("bin type", pack({"type": b"cancel", "id": "a"})),
        ("list type", pack({"type": ["cancel"], "id": "a"})),
        ("deep nesting", nested),
        ("very deep nesting", b"\x91" * 100_000 + b"\xc0"),
        (
            "deep nesting of maps",
            pack({"type": "cancel", "id": "a", "x": _nested_maps(64)}),
        ),
        ("invalid utf-8 string", b"\x81\xa4type\xa2\xff\xfe"),
    ]


def _nested_maps(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"k": value}
    return value


@pytest.mark.parametrize(("case", "data"), bad_frame_cases(), ids=lambda v: str(v)[:30])
def test_bad_frames(case: str, data: bytes | str) -> None:
    error = decode_error(data)
    assert type(error) is BadFrame, case
    assert error.code is ErrorCode.BAD_FRAME
    assert error.code in FRAME_ERROR_CODES
    assert error.id is None
    assert error.field is None
    with pytest.raises(BadFrame):
        unpack_frame(data)


@pytest.mark.parametrize(("case", "data"), bad_frame_cases(), ids=lambda v: str(v)[:30])
def test_bad_frames_are_bad_for_the_server_decoder_too(case: str, data: bytes | str) -> None:
    with pytest.raises(BadFrame):
        decode_server_message(data)  # type: ignore[arg-type]


def test_bad_frame_messages_say_what_is_wrong() -> None:
    assert "text" in decode_error("hello").message
    assert "trailing" in decode_error(pack(VALID_CANCEL) + b"\x01").message
    assert "map" in decode_error(pack([1])).message
    assert "key" in decode_error(pack({"type": "cancel", 3: 1})).message
    assert (
        "extension" in decode_error(pack({"type": "cancel", "x": msgpack.ExtType(1, b"")})).message
    )
    assert "type" in decode_error(pack({"id": "a"})).message


def test_moderate_nesting_is_not_a_bad_frame() -> None:
    value = {"type": "cancel", "id": "a", "x": [[[[[[[[[[1]]]]]]]]]]}
    error = decode_error(pack(value))
    assert type(error) is InvalidRequest
    assert error.field == "x"


def test_unpack_frame_returns_the_map() -> None:
    value = {"type": "whatever", "data": b"\x00\x01", "n": [1, 2.5, None, True]}
    assert unpack_frame(pack(value)) == value


# --------------------------------------------------------------------------- unknown_type


@pytest.mark.parametrize("kind", ["hello", "Submit", "", "accepted", "welcome", "submit "])
def test_unknown_type_echoes_a_string_id(kind: str) -> None:
    error = decode_error(pack({"type": kind, "id": "weird id!" * 10}))
    assert type(error) is UnknownType
    assert error.code is ErrorCode.UNKNOWN_TYPE
    assert error.code in FRAME_ERROR_CODES
    assert error.id == "weird id!" * 10
    assert error.field is None
    assert repr(kind) in error.message


@pytest.mark.parametrize("raw_id", [None, 7, b"job", ["a"], {"a": 1}, 1.5, True])
def test_unknown_type_has_nil_id_when_id_is_not_a_string(raw_id: object) -> None:
    value: dict[str, Any] = {"type": "ping"}
    if raw_id is not None:
        value["id"] = raw_id
    error = decode_error(pack(value))
    assert type(error) is UnknownType
    assert error.id is None


def test_unknown_type_comes_before_invalid_fields() -> None:
    error = decode_error(pack({"type": "submitt", "id": "a", "params": 3, "junk": 1}))
    assert type(error) is UnknownType
    assert error.id == "a"


def test_bad_frame_comes_before_unknown_type() -> None:
    error = decode_error(pack({"type": "nope", "id": "a", 5: 5}))
    assert type(error) is BadFrame


# --------------------------------------------------------------------------- encoding


def test_error_encodes_field_only_when_set_and_always_id() -> None:
    without = unpack(encode_message(Error(id=None, code="bad_frame", message="bad")))
    assert without == {"type": "error", "id": None, "code": "bad_frame", "message": "bad"}
    with_field = unpack(
        encode_message(
            Error(id="j", code=ErrorCode.INVALID_REQUEST, message="params.width bad", field="x")
        )
    )
    assert with_field == {
        "type": "error",
        "id": "j",
        "code": "invalid_request",
        "message": "params.width bad",
        "field": "x",
    }


def test_error_from_protocol_error_encodes_like_the_server_sends_it() -> None:
    error = decode_error(pack({"type": "submit", "id": "a", "params": {"prompt": 3}}))
    wire = unpack(
        encode_message(
            Error(id=error.id, code=error.code, message=error.message, field=error.field)
        )
    )
    assert wire["code"] == "invalid_request"
    assert wire["field"] == "params.prompt"
    assert wire["id"] == "a"
    bad = decode_error(b"\xc1")
    wire = unpack(encode_message(Error(id=bad.id, code=bad.code, message=bad.message)))
    assert wire["id"] is None
    assert "field" not in wire


def test_welcome_encodes_nil_latent_rgb() -> None:
    model = ModelInfo(
        name="tiny",
        family="sd1",
        modes=["txt2img"],
        schedulers=["euler"],
        loras=[],
        latent_channels=4,
        vae_scale_factor=8,
        latent_rgb=None,
    )
    welcome = Welcome(
        protocol=PROTOCOL_VERSION,
        server="latentcast/0",
        session="s",
        model=model,
        limits=Limits(),
        defaults=Defaults(),
    )
    wire = unpack(encode_message(welcome))
    assert "latent_rgb" in wire["model"]
    assert wire["model"]["latent_rgb"] is None
    assert wire["protocol"] == 1
    assert wire["limits"]["max_bad_frames"] == 16
    assert wire["defaults"] == {
        "width": 512,
        "height": 512,
        "steps": 20,
        "guidance_scale": 7.5,
        "scheduler": "euler",
    }


def test_a_welcome_without_models_lists_its_model_and_features_default_to_none() -> None:
    """How a client reads a server that predates ``models`` / ``features`` / resume."""
    model = {
        "name": "tiny",
        "family": "sd1",
        "modes": ["txt2img"],
        "schedulers": ["euler"],
        "loras": [],
        "latent_channels": 4,
        "vae_scale_factor": 8,
        "latent_rgb": None,
    }
    old = {"type": "welcome", "protocol": 1, "server": "s", "session": "x", "model": model}
    old |= {"limits": {}, "defaults": {}}
    welcome = decode_server_message(msgpack.packb(old))
    assert isinstance(welcome, Welcome)
    assert welcome.models == [welcome.model]
    assert (welcome.features, welcome.resume_token, welcome.resumed) == ([], None, False)
    assert welcome.model.controlnets == [] and welcome.limits.max_controls == 0
    newer = old | {"features": ["models", "teleport"], "models": [model, model | {"name": "b"}]}
    welcome = decode_server_message(msgpack.packb(newer))
    assert isinstance(welcome, Welcome)
    assert [m.name for m in welcome.models] == ["tiny", "b"]
    assert welcome.features == ["models", "teleport"], "unknown features are kept"


def test_queued_omits_loading_unless_set() -> None:
    assert unpack(encode_message(Queued(id="j", position=2))) == {
        "type": "queued",
        "id": "j",
        "position": 2,
    }
    loading = unpack(encode_message(Queued(id="j", position=0, loading=True)))
    assert loading["loading"] is True


def test_encoded_frames_are_one_map_with_binary_payloads() -> None:
    preview = LatentPreview(id="j", step=2, shape=(4, 8, 8), data=b"\x00\x3c" * 4)
    data = encode_message(preview)
    assert data[0] & 0xF0 == 0x80  # a fixmap
    wire = unpack(data)
    assert wire == {
        "type": "preview",
        "kind": "latent",
        "id": "j",
        "step": 2,
        "shape": [4, 8, 8],
        "dtype": "float16",
        "data": b"\x00\x3c" * 4,
    }
    assert isinstance(msgpack.unpackb(data, raw=True)[b"data"], bytes)
    # bin, not str: with raw=False a str would decode to str
    assert isinstance(wire["data"], bytes)


def test_encoded_client_messages_omit_unset_optional_fields() -> None:
    submit = Submit(id="a", params=GenerationParams(prompt="p"))
    wire = unpack(encode_message(submit))
    assert wire["type"] == "submit"
    assert "replaces" not in wire
    assert wire["params"] == {"prompt": "p", "negative_prompt": "", "num_images": 1, "loras": []}
    assert None not in wire["preview"].values()
    assert unpack(encode_message(Cancel(id="a"))) == {"type": "cancel", "id": "a"}


def test_encoded_floats_survive_as_floats() -> None:
    params = GenerationParams(prompt="p", guidance_scale=7.0)
    submit = Submit(id="a", params=params)
    decoded = decode_client_message(encode_message(submit), RULES)
    assert isinstance(decoded, Submit)
    assert decoded.params.guidance_scale == 7.0
    assert not math.isnan(decoded.params.guidance_scale or 0.0)


# --------------------------------------------------------------------------- server decode


@pytest.mark.parametrize(
    "value",
    [
        {"type": "accepted"},
        {"type": "accepted", "id": "a", "position": "first"},
        {"type": "queued", "position": 1},
        {"type": "hello", "id": "a"},
        {"type": "submit", "id": "a", "params": {"prompt": "x"}},
        {"type": "preview", "kind": "video", "id": "a", "step": 1, "data": b""},
        {"type": "preview", "id": "a", "step": 1, "data": b""},
        {"type": "cancelled", "id": "a", "step": 1, "reason": "bored"},
        {"type": "error", "code": "internal", "message": "m"},
        {"type": "complete", "id": "a", "images": [{"data": b""}], "timings": {}},
        {"type": "welcome"},
        {"type": "draining", "deadline_ms": [1]},
    ],
)
def test_server_decoder_rejects_invalid_messages_with_bad_frame(value: dict[str, Any]) -> None:
    with pytest.raises(BadFrame) as info:
        decode_server_message(pack(value))
    assert info.value.id is None


def test_server_decoder_accepts_nil_error_id() -> None:
    message = decode_server_message(
        pack({"type": "error", "id": None, "code": "bad_frame", "message": "m"})
    )
    assert message == Error(id=None, code="bad_frame", message="m")


# --------------------------------------------------------------------------- typing


def test_protocol_package_is_mypy_strict_clean() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "protocol"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
