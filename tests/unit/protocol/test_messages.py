"""Unit tests for latentcast.protocol.messages (+ errors, limits): submit and cancel validation.

Every case goes through the real decoder (MessagePack bytes in), as the server sees it.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from latentcast.protocol import (
    DROPPABLE_TYPES,
    FRAME_ERROR_CODES,
    TERMINAL_TYPES,
    BadFrame,
    Cancel,
    Defaults,
    ErrorCode,
    GenerationParams,
    InvalidRequest,
    Limits,
    LoraRef,
    ModelRules,
    OutputRequest,
    PreviewRequest,
    ProtocolError,
    Submit,
    SubmitRules,
    UnknownType,
    decode_client_message,
    encode_message,
)
from latentcast.protocol.limits import JOB_ID_MAX_LENGTH, MAX_SEED

LIMITS = Limits(
    max_width=1024,
    max_height=768,
    max_steps=50,
    max_images=4,
    max_prompt_chars=10,
    max_jobs_per_session=8,
)
RULES = SubmitRules(limits=LIMITS, schedulers=("euler", "ddim"), loras=("detail", "style"))


def pack(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def submit(params: Any = None, /, **top: Any) -> dict[str, Any]:
    """A submit map; ``params`` entries are merged over a valid minimal params map."""
    message: dict[str, Any] = {"type": "submit", "id": "job-1"}
    if isinstance(params, dict):
        message["params"] = {"prompt": "a cat", **params}
    elif params is not None:
        message["params"] = params
    else:
        message["params"] = {"prompt": "a cat"}
    message.update(top)
    return message


def decode(value: Any, rules: SubmitRules | None = RULES) -> Submit | Cancel:
    return decode_client_message(pack(value), rules)


def decode_submit(value: Any, rules: SubmitRules | None = RULES) -> Submit:
    message = decode(value, rules)
    assert isinstance(message, Submit)
    return message


def invalid(value: Any, rules: SubmitRules | None = RULES) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        decode(value, rules)
    error = info.value
    assert error.code is ErrorCode.INVALID_REQUEST
    assert error.code not in FRAME_ERROR_CODES
    assert error.message.startswith(error.field), error.message
    return error


def field_of(value: Any, rules: SubmitRules | None = RULES) -> str:
    return invalid(value, rules).field


# --------------------------------------------------------------------------- valid submits


def test_minimal_submit_takes_defaults() -> None:
    message = decode_submit(submit())
    assert message.id == "job-1"
    assert message.replaces is None
    params = message.params
    assert params.prompt == "a cat"
    assert params.negative_prompt == ""
    assert params.width is None and params.height is None and params.steps is None
    assert params.guidance_scale is None and params.seed is None and params.scheduler is None
    assert params.num_images == 1
    assert params.init_image is None and params.strength is None and params.mask is None
    assert params.loras == []
    assert message.preview == PreviewRequest(kind="none", every=1, format="jpeg", max_side=None)
    assert message.output == OutputRequest(format="png", quality=90)


def test_full_submit_is_decoded_field_by_field() -> None:
    message = decode_submit(
        submit(
            {
                "negative_prompt": "blurry",
                "width": 1024,
                "height": 768,
                "steps": 50,
                "guidance_scale": 30,
                "seed": MAX_SEED,
                "scheduler": "ddim",
                "num_images": 4,
                "init_image": b"\x89PNG",
                "strength": 1,
                "mask": b"RIFF",
                "loras": [{"name": "detail"}, {"name": "style", "scale": -10}],
            },
            preview={"kind": "image", "every": 3, "format": "webp", "max_side": 8},
            output={"format": "jpeg", "quality": 1},
            replaces="job-0",
        )
    )
    params = message.params
    assert (params.width, params.height, params.steps) == (1024, 768, 50)
    assert params.guidance_scale == 30.0 and isinstance(params.guidance_scale, float)
    assert params.seed == 2**32 - 1
    assert params.scheduler == "ddim"
    assert params.num_images == 4
    assert params.init_image == b"\x89PNG" and params.mask == b"RIFF"
    assert params.strength == 1.0 and isinstance(params.strength, float)
    assert params.loras == [LoraRef(name="detail", scale=1.0), LoraRef(name="style", scale=-10.0)]
    assert isinstance(params.loras[1].scale, float)
    assert message.preview == PreviewRequest(kind="image", every=3, format="webp", max_side=8)
    assert message.output == OutputRequest(format="jpeg", quality=1)
    assert message.replaces == "job-0"


def test_cancel() -> None:
    assert decode({"type": "cancel", "id": "a.b:c-d_9"}) == Cancel(id="a.b:c-d_9")


def test_models_are_frozen() -> None:
    message = decode_submit(submit())
    with pytest.raises(ValidationError):
        message.id = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError):
        message.params.prompt = "x"  # type: ignore[misc]


# --------------------------------------------------------------------------- ids


@pytest.mark.parametrize(
    "job_id", ["a", "A" * JOB_ID_MAX_LENGTH, "0", "a.b", "x:y", "x-y", "x_y", "..", "-"]
)
def test_valid_ids(job_id: str) -> None:
    assert decode_submit(submit(id=job_id)).id == job_id
    assert decode({"type": "cancel", "id": job_id}) == Cancel(id=job_id)


@pytest.mark.parametrize(
    "job_id", ["", "a" * 65, "a b", "a/b", "é", "a\n", "\na", "a\x00", "job#1", "🐈"]
)
def test_invalid_ids_are_rejected_and_echoed(job_id: str) -> None:
    for value in (submit(id=job_id), {"type": "cancel", "id": job_id}):
        error = invalid(value)
        assert error.field == "id"
        assert error.id == job_id
        assert error.message.startswith("id ")


@pytest.mark.parametrize("raw_id", [7, 7.5, True, b"job", ["a"], {"a": "b"}])
def test_non_string_id_is_invalid_with_nil_id(raw_id: Any) -> None:
    for value in (submit(id=raw_id), {"type": "cancel", "id": raw_id}):
        error = invalid(value)
        assert error.field == "id"
        assert error.id is None


def test_missing_or_nil_id() -> None:
    for value in ({"type": "cancel"}, {"type": "cancel", "id": None}):
        error = invalid(value)
        assert error.field == "id"
        assert error.id is None
        assert "required" in error.message
    message = submit()
    del message["id"]
    assert field_of(message) == "id"


def test_seventy_char_id_is_echoed_even_though_invalid() -> None:
    long_id = "x" * 70
    error = invalid(submit({"width": 3}, id=long_id))
    assert error.field == "id"
    assert error.id == long_id


def test_invalid_request_echoes_valid_id() -> None:
    error = invalid(submit({"steps": 0}, id="my.job"))
    assert error.id == "my.job"
    assert error.field == "params.steps"


# --------------------------------------------------------------------------- first field wins


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (submit({"width": 3}, id="bad id"), "id"),
        (submit({"width": 3, "steps": 0}), "params.width"),
        (submit({"height": 3, "steps": 0}), "params.height"),
        (submit({"width": 64, "height": 65, "steps": 0}), "params.height"),
        (submit({"steps": 0, "guidance_scale": -1}), "params.steps"),
        (submit({"guidance_scale": 31, "seed": -1}), "params.guidance_scale"),
        (submit({"seed": -1, "scheduler": "nope"}), "params.seed"),
        (submit({"scheduler": "nope", "num_images": 0}), "params.scheduler"),
        (submit({"num_images": 0, "strength": 0.5}), "params.num_images"),
        (submit({"strength": 0.5, "mask": b"m"}), "params.strength"),
        (submit({"mask": b"m", "loras": 1}), "params.mask"),
        (submit({"negative_prompt": 1, "width": 3}), "params.negative_prompt"),
        ({"type": "submit", "id": "a", "params": {"width": 3}}, "params.prompt"),
        (
            submit({"loras": [{"name": "detail", "scale": 11}, {"name": "nope"}]}),
            "params.loras.0.scale",
        ),
        (submit({"width": 3}, preview={"every": 0}), "params.width"),
        (submit(preview={"every": 0}, output={"quality": 0}), "preview.every"),
        (submit(preview={"kind": "x", "every": 0}), "preview.kind"),
        (submit(preview={"every": 0, "max_side": 1}), "preview.every"),
        (submit(output={"format": "gif", "quality": 0}), "output.format"),
        (submit(output={"quality": 0}, replaces="job-1"), "output.quality"),
        (submit({"steps": 0}, replaces="bad id"), "params.steps"),
    ],
)
def test_first_offending_field_wins(value: dict[str, Any], field: str) -> None:
    assert field_of(value) == field


def test_list_items_by_index() -> None:
    loras = [{"name": "detail"}, {"name": "style", "scale": 10.5}]
    assert field_of(submit({"loras": loras})) == "params.loras.1.scale"
    assert field_of(submit({"loras": [{"name": "detail"}, {"name": 3}]})) == "params.loras.1.name"
    assert field_of(submit({"loras": [{"scale": 1}]})) == "params.loras.0.name"
    assert field_of(submit({"loras": [{"name": "zzz"}]})) == "params.loras.0.name"
    assert field_of(submit({"loras": [{"name": "detail", "weight": 1}]})) == (
        "params.loras.0.weight"
    )
    assert field_of(submit({"loras": ["detail"]})) == "params.loras.0"
    assert field_of(submit({"loras": {"name": "detail"}})) == "params.loras"


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("value", "field"),
    [
        (submit(prio=1), "prio"),
        (submit(Replaces="a"), "Replaces"),
        (submit({"sead": 3}), "params.sead"),
        (submit({"Prompt": "x"}), "params.Prompt"),
        (submit(preview={"kind": "latent", "evry": 2}), "preview.evry"),
        (submit(output={"qualty": 3}), "output.qualty"),
        ({"type": "cancel", "id": "a", "reason": "x"}, "reason"),
        # nil is only "absent" for known fields: an unknown key is still a typo.
        (submit(prio=None), "prio"),
        (submit({"sead": None}), "params.sead"),
        ({"type": "cancel", "id": "a", "x": None}, "x"),
    ],
)
def test_unknown_keys_are_named(value: dict[str, Any], field: str) -> None:
    error = invalid(value)
    assert error.field == field
    assert "not a known key" in error.message


# --------------------------------------------------------------------------- numbers


INT_FIELDS = ["width", "height", "steps", "seed", "num_images"]
FLOAT_FIELDS = ["guidance_scale", "strength"]


@pytest.mark.parametrize("key", INT_FIELDS)
@pytest.mark.parametrize("bad", [64.0, 7.0, 7.5, True, False, "64", b"\x40"])
def test_int_params_reject_floats_booleans_and_strings(key: str, bad: Any) -> None:
    assert field_of(submit({key: bad})) == f"params.{key}"


@pytest.mark.parametrize(
    ("container", "key"),
    [("preview", "every"), ("preview", "max_side"), ("output", "quality")],
)
@pytest.mark.parametrize("bad", [8.0, True, "8"])
def test_int_options_reject_floats_booleans_and_strings(container: str, key: str, bad: Any) -> None:
    assert field_of(submit(**{container: {key: bad}})) == f"{container}.{key}"


@pytest.mark.parametrize("key", FLOAT_FIELDS)
@pytest.mark.parametrize("bad", [True, False, "0.5", b"", [0.5], float("nan"), float("inf")])
def test_float_params_reject_booleans_strings_and_non_finite(key: str, bad: Any) -> None:
    assert field_of(submit({key: bad, "init_image": b"i"})) == f"params.{key}"


@pytest.mark.parametrize("bad", [True, "1", float("nan"), float("inf"), float("-inf")])
def test_lora_scale_rejects_booleans_strings_and_non_finite(bad: Any) -> None:
    assert field_of(submit({"loras": [{"name": "detail", "scale": bad}]})) == "params.loras.0.scale"


def test_float_fields_accept_integers() -> None:
    params = decode_submit(
        submit(
            {
                "guidance_scale": 7,
                "init_image": b"i",
                "strength": 1,
                "loras": [{"name": "detail", "scale": -3}],
            }
        )
    ).params
    assert params.guidance_scale == 7.0 and type(params.guidance_scale) is float
    assert params.strength == 1.0 and type(params.strength) is float
    assert params.loras[0].scale == -3.0 and type(params.loras[0].scale) is float


def test_non_finite_guidance_message() -> None:
    assert "finite" in invalid(submit({"guidance_scale": float("inf")})).message


# --------------------------------------------------------------------------- nil is absent


def test_nil_equals_absent_for_optional_fields() -> None:
    nils = {
        "negative_prompt": None,
        "width": None,
        "height": None,
        "steps": None,
        "guidance_scale": None,
        "seed": None,
        "scheduler": None,
        "num_images": None,
        "init_image": None,
        "strength": None,
        "mask": None,
        "loras": None,
    }
    with_nils = decode_submit(
        submit(
            nils,
            preview={"kind": None, "every": None, "format": None, "max_side": None},
            output={"format": None, "quality": None},
            replaces=None,
        )
    )
    assert with_nils == decode_submit(submit())
    assert decode_submit(submit(preview=None, output=None)) == decode_submit(submit())
    # nil lora scale = default 1
    lora = decode_submit(submit({"loras": [{"name": "style", "scale": None}]})).params.loras[0]
    assert lora == LoraRef(name="style", scale=1.0)


def test_nil_strength_and_mask_need_no_init_image() -> None:
    params = decode_submit(submit({"strength": None, "mask": None})).params
    assert params.strength is None and params.mask is None


def test_nil_required_fields_are_missing() -> None:
    error = invalid(submit({"prompt": None}))
    assert error.field == "params.prompt"
    assert "required" in error.message
    assert field_of(submit(None, params=None)) == "params"
    assert field_of({"type": "submit", "id": "a"}) == "params"
    assert field_of(submit({"loras": [{"name": None}]})) == "params.loras.0.name"


# --------------------------------------------------------------------------- ranges


@pytest.mark.parametrize(
    ("key", "good", "bad"),
    [
        ("width", [64, 72, 512, 1024], [0, 8, 56, 63, 65, 100, 1025, 1032, -64]),
        ("height", [64, 768], [56, 770, 776, 1024]),
        ("steps", [1, 2, 50], [0, -1, 51, 1000]),
        ("guidance_scale", [0, 0.0, 1.0, 7.5, 30, 30.0], [-0.001, -1, 30.0001, 31]),
        ("seed", [0, 1, 2**31, 2**32 - 1], [-1, 2**32, 2**63, 2**64 - 1]),
        ("num_images", [1, 4], [0, 5, -1]),
    ],
)
def test_param_ranges(key: str, good: list[Any], bad: list[Any]) -> None:
    for value in good:
        params = decode_submit(submit({key: value})).params
        assert getattr(params, key) == value
    for value in bad:
        assert field_of(submit({key: value})) == f"params.{key}", value


def test_side_messages_name_the_rule() -> None:
    assert "multiple of 8" in invalid(submit({"width": 100})).message
    assert "1024" in invalid(submit({"width": 2048})).message
    assert "768" in invalid(submit({"height": 1024})).message


def test_strength_range_and_init_image_requirement() -> None:
    for strength in (1e-9, 0.5, 1, 1.0):
        params = decode_submit(submit({"init_image": b"i", "strength": strength})).params
        assert params.strength == strength
    for strength in (0, 0.0, -0.5, 1.0001, 2):
        assert field_of(submit({"init_image": b"i", "strength": strength})) == "params.strength"
    error = invalid(submit({"strength": 0.5}))
    assert error.field == "params.strength"
    assert "init_image" in error.message


def test_mask_only_with_init_image() -> None:
    error = invalid(submit({"mask": b"png"}))
    assert error.field == "params.mask"
    assert "init_image" in error.message
    assert decode_submit(submit({"init_image": b"i", "mask": b"m"})).params.mask == b"m"
    assert field_of(submit({"init_image": b"i", "mask": "m"})) == "params.mask"
    assert field_of(submit({"init_image": "i"})) == "params.init_image"


def test_lora_scale_range() -> None:
    for scale in (-10, -10.0, 0, 9.99, 10):
        loras = decode_submit(submit({"loras": [{"name": "detail", "scale": scale}]})).params.loras
        assert loras[0].scale == scale
    for scale in (-10.01, 10.01, 100):
        value = submit({"loras": [{"name": "detail", "scale": scale}]})
        assert field_of(value) == "params.loras.0.scale"


def test_preview_rules() -> None:
    assert decode_submit(submit(preview={"every": 1})).preview.every == 1
    assert decode_submit(submit(preview={"every": 10**9})).preview.every == 10**9
    for every in (0, -1):
        assert field_of(submit(preview={"every": every})) == "preview.every"
    assert decode_submit(submit(preview={"max_side": 8})).preview.max_side == 8
    for side in (7, 0, -8):
        assert field_of(submit(preview={"max_side": side})) == "preview.max_side"
    for kind in ("none", "latent", "image"):
        assert decode_submit(submit(preview={"kind": kind})).preview.kind == kind
    assert field_of(submit(preview={"kind": "video"})) == "preview.kind"
    assert field_of(submit(preview={"format": "png"})) == "preview.format"
    assert field_of(submit(preview="image")) == "preview"


def test_output_rules() -> None:
    for quality in (1, 50, 100):
        assert decode_submit(submit(output={"quality": quality})).output.quality == quality
    for quality in (0, 101, -5):
        assert field_of(submit(output={"quality": quality})) == "output.quality"
    for fmt in ("png", "jpeg", "webp"):
        assert decode_submit(submit(output={"format": fmt})).output.format == fmt
    for fmt in ("jpg", "PNG", "gif", 1):
        assert field_of(submit(output={"format": fmt})) == "output.format"


def test_prompt_length_counts_code_points() -> None:
    emoji = "🐈‍⬛"  # three code points: cat, zero width joiner, black square
    assert len(emoji) == 3
    ten = "🐈" * 10  # 40 UTF-8 bytes, 10 code points
    assert decode_submit(submit({"prompt": ten})).params.prompt == ten
    assert field_of(submit({"prompt": ten + "a"})) == "params.prompt"
    assert decode_submit(submit({"prompt": "é" * 10})).params.prompt == "é" * 10
    assert decode_submit(submit({"prompt": emoji * 3 + "a"})).params.prompt == emoji * 3 + "a"
    assert field_of(submit({"prompt": emoji * 4})) == "params.prompt"
    assert decode_submit(submit({"prompt": ""})).params.prompt == ""


def test_negative_prompt_has_the_same_limit() -> None:
    assert decode_submit(submit({"negative_prompt": "🐈" * 10})).params.negative_prompt
    error = invalid(submit({"negative_prompt": "x" * 11}))
    assert error.field == "params.negative_prompt"
    assert "10" in error.message


@pytest.mark.parametrize("bad", [1, b"a cat", ["a"], True])
def test_prompt_must_be_a_string(bad: Any) -> None:
    assert field_of(submit({"prompt": bad})) == "params.prompt"


def test_replaces_must_differ_from_id() -> None:
    error = invalid(submit(id="same", replaces="same"))
    assert error.field == "replaces"
    assert error.id == "same"
    assert decode_submit(submit(id="same", replaces="other")).replaces == "other"
    assert field_of(submit(replaces="bad id")) == "replaces"
    assert field_of(submit(replaces=3)) == "replaces"


def test_scheduler_must_be_one_of_the_servers() -> None:
    for name in ("euler", "ddim"):
        assert decode_submit(submit({"scheduler": name})).params.scheduler == name
    error = invalid(submit({"scheduler": "dpm"}))
    assert error.field == "params.scheduler"
    assert "dpm" in error.message
    assert field_of(submit({"scheduler": "dpm"}), SubmitRules(schedulers=())) == "params.scheduler"


def test_lora_name_must_be_one_of_the_servers() -> None:
    error = invalid(submit({"loras": [{"name": "detail"}, {"name": "other"}]}))
    assert error.field == "params.loras.1.name"
    assert "other" in error.message


MODEL_RULES = SubmitRules(
    limits=Limits(max_controls=2),
    schedulers=("euler",),
    loras=("detail",),
    controlnets=("scribble",),
    models={
        "fast": ModelRules(schedulers=("euler",), loras=("detail",), controlnets=("scribble",)),
        "xl": ModelRules(schedulers=("ddim",), loras=(), controlnets=("depth",)),
    },
)


def test_model_must_be_one_of_the_servers() -> None:
    assert decode_submit(submit({"model": "xl"}), MODEL_RULES).params.model == "xl"
    assert decode_submit(submit(), MODEL_RULES).params.model is None
    error = invalid(submit({"model": "sdxl"}), MODEL_RULES)
    assert error.field == "params.model"
    assert "sdxl" in error.message and "fast, xl" in error.message
    # Without named models (a client that has no welcome) any name passes.
    assert decode_submit(submit({"model": "anything"}), RULES).params.model == "anything"


def test_model_is_checked_before_every_rule_that_depends_on_it() -> None:
    # An unknown model is reported even when a field earlier on the page is wrong too.
    assert field_of(submit({"model": "nope", "width": 7}), MODEL_RULES) == "params.model"


def test_other_rules_are_the_chosen_models() -> None:
    # ddim and the depth ControlNet are xl's, not the default model's, and the reverse.
    xl = {"model": "xl", "scheduler": "ddim", "controls": [{"name": "depth", "image": b"x"}]}
    assert decode_submit(submit(xl), MODEL_RULES).params.scheduler == "ddim"
    assert field_of(submit({"scheduler": "ddim"}), MODEL_RULES) == "params.scheduler"
    assert field_of(submit({"model": "xl", "scheduler": "euler"}), MODEL_RULES) == (
        "params.scheduler"
    )
    assert field_of(submit({"model": "xl", "loras": [{"name": "detail"}]}), MODEL_RULES) == (
        "params.loras.0.name"
    )
    scribble = [{"name": "scribble", "image": b"x"}]
    assert field_of(submit({"model": "xl", "controls": scribble}), MODEL_RULES) == (
        "params.controls.0.name"
    )
    assert decode_submit(submit({"model": "fast", "controls": scribble}), MODEL_RULES)


def test_controls_are_parsed_with_their_defaults() -> None:
    params = decode_submit(
        submit({"controls": [{"name": "scribble", "image": b"png"}]}), MODEL_RULES
    ).params
    (control,) = params.controls
    assert (control.name, control.image, control.scale) == ("scribble", b"png", 1.0)
    assert (control.start, control.end, control.preprocess) == (0.0, 1.0, "none")
    assert decode_submit(submit(), MODEL_RULES).params.controls == []


@pytest.mark.parametrize(
    ("control", "field"),
    [
        ({"name": "nope", "image": b"x"}, "params.controls.0.name"),
        ({"image": b"x"}, "params.controls.0.name"),
        ({"name": "scribble"}, "params.controls.0.image"),
        ({"name": "scribble", "image": "x"}, "params.controls.0.image"),
        ({"name": "scribble", "image": b"x", "scale": 2.5}, "params.controls.0.scale"),
        ({"name": "scribble", "image": b"x", "scale": -0.1}, "params.controls.0.scale"),
        ({"name": "scribble", "image": b"x", "start": 0.5, "end": 0.5}, "params.controls.0.end"),
        ({"name": "scribble", "image": b"x", "start": 0.6, "end": 0.2}, "params.controls.0.end"),
        ({"name": "scribble", "image": b"x", "end": 1.5}, "params.controls.0.end"),
        ({"name": "scribble", "image": b"x", "start": -1}, "params.controls.0.start"),
        (
            {"name": "scribble", "image": b"x", "preprocess": "depth"},
            "params.controls.0.preprocess",
        ),
        ({"name": "scribble", "image": b"x", "weight": 1}, "params.controls.0.weight"),
    ],
)
def test_bad_controls_name_their_field(control: dict[str, Any], field: str) -> None:
    assert field_of(submit({"controls": [control]}), MODEL_RULES) == field


def test_too_many_controls_is_reported_before_their_contents() -> None:
    three = [{"name": "nope", "image": b"x"}] * 3
    error = invalid(submit({"controls": three}), MODEL_RULES)
    assert error.field == "params.controls"
    assert "at most 2" in error.message
    # A server without the feature announces max_controls 0: any control is too many.
    assert field_of(submit({"controls": three[:1]}), RULES) == "params.controls"


def test_an_encoded_submit_without_controls_has_no_controls_key() -> None:
    # So that a client using no controls still talks to a server that predates them.
    wire = msgpack.unpackb(
        encode_message(Submit(id="a", params=GenerationParams(prompt="p"))), raw=False
    )
    assert "controls" not in wire["params"]
    assert "model" not in wire["params"]


def test_limits_come_from_the_rules() -> None:
    roomy = SubmitRules(
        limits=Limits(max_width=4096, max_height=4096, max_steps=500, max_images=16),
        schedulers=("euler",),
    )
    params = {"width": 4096, "height": 2048, "steps": 500, "num_images": 16, "prompt": "x" * 11}
    decoded = decode_submit(submit(params), roomy).params
    assert (decoded.width, decoded.steps, decoded.num_images) == (4096, 500, 16)
    assert field_of(submit({"width": 4104}), roomy) == "params.width"
    assert field_of(submit({"steps": 501}), roomy) == "params.steps"
    assert field_of(submit({"num_images": 17}), roomy) == "params.num_images"


def test_default_limits_apply_with_default_rules() -> None:
    rules = SubmitRules()
    assert field_of(submit({"width": 1032}), rules) == "params.width"
    assert field_of(submit({"steps": 151}), rules) == "params.steps"
    assert field_of(submit({"num_images": 5}), rules) == "params.num_images"
    assert field_of(submit({"prompt": "x" * 2001}), rules) == "params.prompt"
    assert decode_submit(submit({"prompt": "x" * 2000}), rules).params.prompt == "x" * 2000


def test_without_rules_only_server_independent_checks_apply() -> None:
    params = {
        "prompt": "x" * 100_000,
        "width": 8192,
        "height": 8192,
        "steps": 10_000,
        "num_images": 1000,
        "scheduler": "anything",
        "loras": [{"name": "whatever"}],
    }
    decoded = decode_submit(submit(params), None).params
    assert decoded.width == 8192 and decoded.steps == 10_000 and decoded.num_images == 1000
    assert decoded.scheduler == "anything"
    assert decoded.loras == [LoraRef(name="whatever")]
    # The fixed rules still hold.
    assert field_of(submit({"width": 8196}), None) == "params.width"
    assert field_of(submit({"width": 56}), None) == "params.width"
    assert field_of(submit({"steps": 0}), None) == "params.steps"
    assert field_of(submit({"seed": 2**32}), None) == "params.seed"
    assert field_of(submit({"guidance_scale": 30.5}), None) == "params.guidance_scale"
    assert field_of(submit({"num_images": 0}), None) == "params.num_images"
    assert field_of(submit({"strength": 0.5}), None) == "params.strength"
    assert field_of(submit(replaces="job-1"), None) == "replaces"
    assert field_of(submit(id="a b"), None) == "id"


def test_model_constructors_apply_the_server_independent_rules() -> None:
    with pytest.raises(ValidationError):
        GenerationParams(prompt="x", width=100)
    with pytest.raises(ValidationError):
        GenerationParams(prompt="x", strength=0.5)
    with pytest.raises(ValidationError):
        Submit(id="a", params=GenerationParams(prompt="x"), replaces="a")
    with pytest.raises(ValidationError):
        Cancel(id="")
    with pytest.raises(ValidationError):
        GenerationParams(prompt="x", steps=7.0)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20))
def test_prompt_limit_is_code_points(prompt: str) -> None:
    value = submit({"prompt": prompt})
    if len(prompt) <= LIMITS.max_prompt_chars:
        assert decode_submit(value).params.prompt == prompt
    else:
        assert field_of(value) == "params.prompt"


@settings(max_examples=200, deadline=None)
@given(st.integers(-(2**63), 2**64 - 1))
def test_width_rule_for_any_integer(width: int) -> None:
    value = submit({"width": width})
    if 64 <= width <= LIMITS.max_width and width % 8 == 0:
        assert decode_submit(value).params.width == width
    else:
        assert field_of(value) == "params.width"


# --------------------------------------------------------------------------- errors, limits


def test_error_classes() -> None:
    bad = BadFrame("nope")
    assert (bad.code, bad.id, bad.field, bad.message, str(bad)) == (
        ErrorCode.BAD_FRAME,
        None,
        None,
        "nope",
        "nope",
    )
    unknown = UnknownType("what", id="j")
    assert (unknown.code, unknown.id, unknown.field) == (ErrorCode.UNKNOWN_TYPE, "j", None)
    invalid_request = InvalidRequest("params.width is bad", field="params.width", id="j")
    assert invalid_request.code is ErrorCode.INVALID_REQUEST
    assert invalid_request.field == "params.width"
    assert invalid_request.id == "j"
    for error in (bad, unknown, invalid_request):
        assert isinstance(error, ProtocolError)
    assert FRAME_ERROR_CODES == {ErrorCode.BAD_FRAME, ErrorCode.UNKNOWN_TYPE}


def test_error_codes_match_the_protocol_table() -> None:
    assert {code.value for code in ErrorCode} == {
        "bad_frame",
        "unknown_type",
        "invalid_request",
        "duplicate_id",
        "unknown_job",
        "unsupported",
        "bad_image",
        "queue_full",
        "too_many_jobs",
        "draining",
        "generation_failed",
        "shutdown",
        "internal",
    }
    assert ErrorCode.QUEUE_FULL == "queue_full"


def test_message_type_sets() -> None:
    assert DROPPABLE_TYPES == {"queued", "progress", "preview"}
    assert TERMINAL_TYPES == {"complete", "cancelled", "error"}


def test_limits_and_defaults() -> None:
    limits = Limits()
    assert limits.max_bad_frames == 16
    assert limits.max_width >= 64 and limits.max_height >= 64
    with pytest.raises(ValidationError):
        Limits(max_width=32)
    with pytest.raises(ValidationError):
        Limits(max_steps=0)
    with pytest.raises(ValidationError):
        limits.max_steps = 3  # type: ignore[misc]
    # Clients read them back from welcome, ignoring what they do not know.
    assert Limits.model_validate({"max_steps": 9, "future": 1}).max_steps == 9
    defaults = Defaults.model_validate({"width": 256, "scheduler": "ddim", "future": True})
    assert (defaults.width, defaults.height, defaults.scheduler) == (256, 512, "ddim")


def test_decode_reports_unknown_type_before_field_checks() -> None:
    with pytest.raises(UnknownType):
        decode({"type": "submits", "id": "a"})
