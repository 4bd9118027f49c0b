"""Requests built and checked with the protocol models and the server's rules."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from latentcast.client import GeneratedImage, RequestRejected, latent_to_pil
from latentcast.client.connection import _controls, _loras, _preview, check_submit
from latentcast.client.images import image_bytes
from latentcast.protocol import (
    ControlRef,
    LatentPreview,
    LatentRGBInfo,
    Limits,
    LoraRef,
    PreviewRequest,
    SubmitRules,
)

RULES = SubmitRules(limits=Limits(max_steps=50), schedulers=("euler",), loras=("style",))


def _payload(**params: object) -> dict[str, object]:
    return {"type": "submit", "id": "j1", "params": {"prompt": "p", **params}}


def test_a_valid_request_becomes_a_submit_with_nil_meaning_absent() -> None:
    submit = check_submit(
        {
            **_payload(steps=4, width=None, loras=_loras(["style", ("style", 0.5)])),
            "preview": _preview("latent", 2, None, None),
            "output": {"format": "webp", "quality": None},
            "replaces": None,
        },
        RULES,
    )
    assert submit.params.steps == 4 and submit.params.width is None
    assert [(lora.name, lora.scale) for lora in submit.params.loras] == [
        ("style", 1.0),
        ("style", 0.5),
    ]
    assert (submit.preview.kind, submit.preview.every) == ("latent", 2)
    assert (submit.output.format, submit.output.quality) == ("webp", 90)


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"width": 100}, "params.width"),
        ({"steps": 51}, "params.steps"),
        ({"steps": 2.0}, "params.steps"),
        ({"scheduler": "nope"}, "params.scheduler"),
        ({"loras": [{"name": "unknown"}]}, "params.loras.0.name"),
        ({"strength": 0.5}, "params.strength"),
    ],
)
def test_a_bad_field_is_rejected_locally_as_the_server_would(
    params: dict[str, object], field: str
) -> None:
    with pytest.raises(RequestRejected) as rejected:
        check_submit(_payload(**params), RULES)
    error = rejected.value
    assert (error.code, error.field, error.local, error.job_id) == (
        "invalid_request",
        field,
        True,
        "j1",
    )
    assert error.message.startswith(field)


def test_preview_options_override_a_preview_request() -> None:
    base = PreviewRequest(kind="image", every=3, format="webp")
    assert _preview(base, None, "jpeg", 16) == {
        "kind": "image",
        "every": 3,
        "format": "jpeg",
        "max_side": 16,
    }
    assert _preview(None, None, None, None) == {"kind": None}
    assert _loras([LoraRef(name="x", scale=2.0)]) == [{"name": "x", "scale": 2.0}]


def test_controls_take_tuples_mappings_or_control_refs_with_any_image_input(tmp_path) -> None:
    picture = Image.new("RGB", (8, 8), (255, 0, 0))
    path = tmp_path / "c.png"
    path.write_bytes(b"file")
    controls = _controls(
        [
            ("a", b"raw"),
            ("a", path, 0.5),
            {"name": "a", "image": picture, "preprocess": "canny", "start": 0.2},
            ControlRef(name="a", image=b"ref", end=0.5),
        ]
    )
    assert controls[0] == {"name": "a", "image": b"raw"}
    assert controls[1] == {"name": "a", "image": b"file", "scale": 0.5}
    assert controls[2]["image"] == image_bytes(picture)
    assert (controls[2]["preprocess"], controls[2]["start"]) == ("canny", 0.2)
    assert controls[3] == {
        "name": "a",
        "image": b"ref",
        "scale": 1.0,
        "start": 0.0,
        "end": 0.5,
        "preprocess": "none",
    }
    rules = SubmitRules(limits=Limits(max_controls=3), controlnets=("a",))
    submit = check_submit(_payload(controls=controls[:3]), rules)
    assert [control.scale for control in submit.params.controls] == [1.0, 0.5, 1.0]
    with pytest.raises(RequestRejected) as rejected:
        check_submit(_payload(controls=_controls([("b", b"x")])), rules)
    assert rejected.value.field == "params.controls.0.name"
    with pytest.raises(RequestRejected) as rejected:
        check_submit(_payload(controls=controls * 2), rules)
    assert rejected.value.field == "params.controls"


def test_image_inputs_are_bytes_pil_or_paths(tmp_path) -> None:
    picture = Image.new("RGB", (8, 8), (255, 0, 0))
    encoded = image_bytes(picture)
    assert Image.open(io.BytesIO(encoded)).format == "PNG"
    path = tmp_path / "in.png"
    path.write_bytes(encoded)
    assert image_bytes(path) == encoded == image_bytes(str(path)) == image_bytes(encoded)
    with pytest.raises(TypeError):
        image_bytes(42)  # type: ignore[arg-type]


def test_latent_to_pil_follows_the_protocol_formula() -> None:
    latent = np.array([[[0.5, -2.0]], [[0.25, 0.0]]], dtype="<f2")  # [c=2, h=1, w=2]
    preview = LatentPreview(id="a", step=1, shape=(2, 1, 2), data=latent.tobytes())
    rgb = LatentRGBInfo(factors=[(1.0, 0.0, 0.5), (0.0, 1.0, 0.5)], bias=(0.0, 0.1, -0.2))
    pixels = np.asarray(latent_to_pil(preview, rgb))
    assert pixels.shape == (1, 2, 3)
    expected = []
    for x in range(2):
        v = [
            latent[0, 0, x] * 1.0 + 0.0,
            latent[1, 0, x] * 1.0 + 0.1,
            latent[0, 0, x] * 0.5 + latent[1, 0, x] * 0.5 - 0.2,
        ]
        expected.append([round((min(max(c, -1), 1) + 1) * 127.5) for c in v])
    assert pixels[0].tolist() == expected
    wrong = LatentRGBInfo(factors=[(1.0, 0.0, 0.0)], bias=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError):
        latent_to_pil(preview, wrong)


def test_generated_image_decodes_and_saves(tmp_path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8)).save(buffer, format="JPEG")
    image = GeneratedImage(data=buffer.getvalue(), format="jpeg", width=16, height=8, seed=5)
    assert image.to_pil().size == (16, 8)
    assert image.suffix == ".jpg"
    assert image.save(tmp_path / "x.jpg").read_bytes() == image.data
