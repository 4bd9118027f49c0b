"""Message models of protocol v1 (PROTOCOL.md sections 2 to 4).

Client messages (:class:`Submit`, :class:`Cancel`) are validated strictly: ints reject
floats, booleans and strings; floats accept any number but booleans; unknown keys are
rejected; nil means absent. Checks that depend on the server (limits, scheduler and LoRA
names) read a :class:`SubmitRules` passed as the pydantic validation context; without
one, only the server-independent rules apply (what a client can check before sending).

Server messages ignore unknown keys, so that a client built on this package keeps
working when a newer server adds fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .errors import quoted
from .limits import (
    DEFAULT_OUTPUT_QUALITY,
    JOB_ID_PATTERN,
    MAX_CONTROL_SCALE,
    MAX_GUIDANCE_SCALE,
    MAX_LORA_SCALE,
    MAX_LORAS,
    MAX_SEED,
    MIN_PREVIEW_SIDE,
    MIN_SIDE,
    SIDE_MULTIPLE,
    Defaults,
    Limits,
)

JobId = Annotated[str, Field(pattern=JOB_ID_PATTERN)]
GenerationMode = Literal["txt2img", "img2img", "inpaint"]
PreviewKind = Literal["none", "latent", "image"]
PreviewFormat = Literal["jpeg", "webp"]
OutputFormat = Literal["png", "jpeg", "webp"]
CancelReason = Literal["client", "replaced", "disconnect"]
ControlPreprocess = Literal["none", "canny", "invert"]


@dataclass(frozen=True)
class ModelRules:
    """The names a submit may choose on one model."""

    schedulers: tuple[str, ...] = ()
    loras: tuple[str, ...] = ()
    controlnets: tuple[str, ...] = ()


@dataclass(frozen=True)
class SubmitRules:
    """What a server checks a submit against beyond the fixed rules of the protocol.

    ``schedulers``, ``loras`` and ``controlnets`` are those of the model being checked
    against. ``models`` maps every model a submit may name in ``params.model`` to its rules
    (the default model included); empty means ``params.model`` is not checked against
    names. Since every other rule depends on the model, the codec validates a submit
    against :meth:`choosing` its ``params.model`` first.
    """

    limits: Limits = field(default_factory=Limits)
    schedulers: tuple[str, ...] = ()
    loras: tuple[str, ...] = ()
    controlnets: tuple[str, ...] = ()
    models: Mapping[str, ModelRules] = field(default_factory=dict, hash=False, compare=False)

    def choosing(self, model: object) -> SubmitRules:
        """These rules with the names of ``model`` (a name in ``models``; else unchanged:
        the ``params.model`` check reports an unknown name)."""
        chosen = self.models.get(model) if isinstance(model, str) else None
        if chosen is None:
            return self
        return replace(
            self,
            schedulers=chosen.schedulers,
            loras=chosen.loras,
            controlnets=chosen.controlnets,
        )


def _rules(info: ValidationInfo) -> SubmitRules | None:
    context = info.context
    return context if isinstance(context, SubmitRules) else None


# --------------------------------------------------------------------------- client


class _ClientModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _nil_is_absent(cls, data: Any) -> Any:
        if isinstance(data, dict):
            # Only known fields: an unknown key is rejected even when its value is nil.
            return {
                key: value
                for key, value in data.items()
                if value is not None or key not in cls.model_fields
            }
        return data


class LoraRef(_ClientModel):
    name: str
    scale: float = Field(default=1.0, ge=-MAX_LORA_SCALE, le=MAX_LORA_SCALE, allow_inf_nan=False)

    @field_validator("name")
    @classmethod
    def _known_lora(cls, name: str, info: ValidationInfo) -> str:
        rules = _rules(info)
        if rules is not None and name not in rules.loras:
            known = ", ".join(rules.loras) or "none"
            raise ValueError(f"unknown LoRA {quoted(name)} (this server has: {known})")
        return name


class ControlRef(_ClientModel):
    """One entry of ``params.controls``: a ControlNet steering the job (feature "controls")."""

    name: str
    image: bytes
    scale: float = Field(default=1.0, ge=0.0, le=MAX_CONTROL_SCALE, allow_inf_nan=False)
    start: float = Field(default=0.0, ge=0.0, le=1.0, allow_inf_nan=False)
    end: float = Field(default=1.0, ge=0.0, le=1.0, allow_inf_nan=False)
    preprocess: ControlPreprocess = "none"

    @field_validator("name")
    @classmethod
    def _known_controlnet(cls, name: str, info: ValidationInfo) -> str:
        rules = _rules(info)
        if rules is not None and name not in rules.controlnets:
            known = ", ".join(rules.controlnets) or "none"
            raise ValueError(f"unknown ControlNet {quoted(name)} (this model has: {known})")
        return name

    @field_validator("end")
    @classmethod
    def _after_start(cls, end: float, info: ValidationInfo) -> float:
        start = info.data.get("start")
        if start is not None and end <= start:
            raise ValueError(f"must be greater than start ({start}), got {end}")
        return end


class GenerationParams(_ClientModel):
    """``submit.params``. Optional values left ``None`` take the server's defaults.

    ``model`` comes first: every other rule is the chosen model's, so an unknown model is
    the first thing reported (the codec checks the rest against that model's names).
    """

    model: str | None = None
    prompt: str
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    steps: int | None = Field(default=None, ge=1)
    guidance_scale: float | None = Field(
        default=None, ge=0.0, le=MAX_GUIDANCE_SCALE, allow_inf_nan=False
    )
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    scheduler: str | None = None
    num_images: int = Field(default=1, ge=1)
    init_image: bytes | None = None
    strength: float | None = Field(default=None, gt=0.0, le=1.0, allow_inf_nan=False)
    mask: bytes | None = None
    loras: list[LoraRef] = Field(default_factory=list, max_length=MAX_LORAS)
    #: Left out of an encoded submit when empty, so that a client that uses no control
    #: can still talk to a server that predates the feature.
    controls: list[ControlRef] = Field(default_factory=list, exclude_if=lambda value: not value)

    @property
    def mode(self) -> GenerationMode:
        """What the job does: an init_image makes it img2img, a mask too makes it inpaint."""
        if self.init_image is None:
            return "txt2img"
        return "inpaint" if self.mask is not None else "img2img"

    @field_validator("model")
    @classmethod
    def _known_model(cls, name: str | None, info: ValidationInfo) -> str | None:
        rules = _rules(info)
        if name is not None and rules is not None and rules.models and name not in rules.models:
            raise ValueError(
                f"unknown model {quoted(name)} (this server has: {', '.join(rules.models)})"
            )
        return name

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _prompt_length(cls, text: str, info: ValidationInfo) -> str:
        rules = _rules(info)
        if rules is not None and len(text) > rules.limits.max_prompt_chars:
            raise ValueError(
                f"is {len(text)} characters; at most {rules.limits.max_prompt_chars} allowed"
            )
        return text

    @field_validator("width", "height")
    @classmethod
    def _side(cls, side: int | None, info: ValidationInfo) -> int | None:
        if side is None:
            return None
        rules = _rules(info)
        if rules is not None:
            limit = (
                rules.limits.max_width if info.field_name == "width" else rules.limits.max_height
            )
        else:
            limit = None
        if side < MIN_SIDE or (limit is not None and side > limit):
            upper = f" to {limit}" if limit is not None else " or more"
            raise ValueError(f"must be {MIN_SIDE}{upper}, got {side}")
        if side % SIDE_MULTIPLE:
            raise ValueError(f"must be a multiple of {SIDE_MULTIPLE}, got {side}")
        return side

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: int | None, info: ValidationInfo) -> int | None:
        rules = _rules(info)
        if steps is not None and rules is not None and steps > rules.limits.max_steps:
            raise ValueError(f"must be at most {rules.limits.max_steps}, got {steps}")
        return steps

    @field_validator("scheduler")
    @classmethod
    def _scheduler(cls, name: str | None, info: ValidationInfo) -> str | None:
        rules = _rules(info)
        if name is not None and rules is not None and name not in rules.schedulers:
            raise ValueError(
                f"unknown scheduler {quoted(name)} (this server has: {', '.join(rules.schedulers)})"
            )
        return name

    @field_validator("num_images")
    @classmethod
    def _num_images(cls, count: int, info: ValidationInfo) -> int:
        rules = _rules(info)
        if rules is not None and count > rules.limits.max_images:
            raise ValueError(f"must be at most {rules.limits.max_images}, got {count}")
        return count

    @field_validator("controls", mode="before")
    @classmethod
    def _control_count(cls, controls: Any, info: ValidationInfo) -> Any:
        # Counted before the entries are validated: "too many" is the error to report.
        rules = _rules(info)
        if (
            rules is not None
            and isinstance(controls, list)
            and len(controls) > rules.limits.max_controls
        ):
            raise ValueError(
                f"has {len(controls)} entries; at most {rules.limits.max_controls} allowed"
                " (limits.max_controls)"
            )
        return controls

    @field_validator("strength", "mask")
    @classmethod
    def _needs_init_image(cls, value: Any, info: ValidationInfo) -> Any:
        if info.data.get("init_image") is None:
            raise ValueError("is only allowed together with init_image")
        return value


class PreviewRequest(_ClientModel):
    """``submit.preview``: which previews the client wants, and how often."""

    kind: PreviewKind = "none"
    every: int = Field(default=1, ge=1)
    format: PreviewFormat = "jpeg"
    max_side: int | None = Field(default=None, ge=MIN_PREVIEW_SIDE)


class OutputRequest(_ClientModel):
    """``submit.output``: how the finished images are encoded."""

    format: OutputFormat = "png"
    quality: int = Field(default=DEFAULT_OUTPUT_QUALITY, ge=1, le=100)


class Submit(_ClientModel):
    type: Literal["submit"] = "submit"
    id: JobId
    params: GenerationParams
    preview: PreviewRequest = Field(default_factory=PreviewRequest)
    output: OutputRequest = Field(default_factory=OutputRequest)
    replaces: JobId | None = None

    @field_validator("replaces")
    @classmethod
    def _not_itself(cls, replaces: str | None, info: ValidationInfo) -> str | None:
        if replaces is not None and replaces == info.data.get("id"):
            raise ValueError("must differ from id")
        return replaces


class Cancel(_ClientModel):
    type: Literal["cancel"] = "cancel"
    id: JobId


ClientMessage = Submit | Cancel

#: ``type`` value -> model, for the codec's dispatch.
CLIENT_MESSAGE_TYPES: dict[str, type[Submit | Cancel]] = {
    "submit": Submit,
    "cancel": Cancel,
}


# --------------------------------------------------------------------------- server


class _ServerModel(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _ServerMessage(_ServerModel):
    """A message the server sends (as opposed to a part of one)."""

    #: On a resumable session (section 2a), every message after ``welcome``: 1 for the
    #: first, one more per message, counted across the session's connections.
    seq: int | None = Field(default=None, exclude_if=lambda value: value is None)


class LatentRGBInfo(_ServerModel):
    """Factors for ``v = sum_c latent[c] * factors[c][k] + bias[k]`` per channel k."""

    factors: list[tuple[float, float, float]]
    bias: tuple[float, float, float]


class ModelInfo(_ServerModel):
    name: str
    family: str
    modes: list[str]
    schedulers: list[str]
    loras: list[str]
    #: ControlNets that jobs on this model may name (feature "controls").
    controlnets: list[str] = Field(default_factory=list)
    latent_channels: int
    vae_scale_factor: int
    latent_rgb: LatentRGBInfo | None


class Welcome(_ServerMessage):
    type: Literal["welcome"] = "welcome"
    protocol: int
    server: str
    session: str
    #: The default model: the one a submit without ``params.model`` uses (= models[0]).
    model: ModelInfo
    #: Every model the server can run, the default first. A server that predates the
    #: field is read as offering its one ``model``.
    models: list[ModelInfo] = Field(default_factory=list)
    #: The optional features this server implements ("batching", "models", "controls",
    #: "resume"); a client checks before using one. Names it does not know are kept.
    features: list[str] = Field(default_factory=list)
    #: Present on a resumable session only (section 2a); nil otherwise.
    resume_token: str | None = None
    #: True when this connection took over an existing session.
    resumed: bool = False
    limits: Limits
    defaults: Defaults

    @model_validator(mode="before")
    @classmethod
    def _models_default_to_the_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("models") and "model" in data:
            return {**data, "models": [data["model"]]}
        return data


class Accepted(_ServerMessage):
    type: Literal["accepted"] = "accepted"
    id: str
    position: int


class Queued(_ServerMessage):
    type: Literal["queued"] = "queued"
    id: str
    position: int
    #: True while the job waits for its model to be loaded (feature "models"); omitted
    #: when not.
    loading: bool | None = Field(default=None, exclude_if=lambda value: value is None)


class Started(_ServerMessage):
    type: Literal["started"] = "started"
    id: str
    seed: int
    steps: int
    width: int
    height: int
    #: latentcast's addition (clients ignore unknown keys): things about the job a person
    #: should know, e.g. that a prompt was longer than the text encoder reads. Omitted
    #: when there are none.
    warnings: list[str] | None = Field(default=None, exclude_if=lambda value: not value)


class Progress(_ServerMessage):
    type: Literal["progress"] = "progress"
    id: str
    step: int
    steps: int
    elapsed_ms: int


class LatentPreview(_ServerMessage):
    type: Literal["preview"] = "preview"
    kind: Literal["latent"] = "latent"
    id: str
    step: int
    shape: tuple[int, int, int]
    dtype: Literal["float16"] = "float16"
    data: bytes


class ImagePreview(_ServerMessage):
    type: Literal["preview"] = "preview"
    kind: Literal["image"] = "image"
    id: str
    step: int
    format: PreviewFormat
    width: int
    height: int
    data: bytes


class ImageResult(_ServerModel):
    data: bytes
    format: OutputFormat
    width: int
    height: int
    seed: int


class Timings(_ServerModel):
    queued_ms: int
    run_ms: int


class Complete(_ServerMessage):
    type: Literal["complete"] = "complete"
    id: str
    images: list[ImageResult]
    timings: Timings


class Cancelled(_ServerMessage):
    type: Literal["cancelled"] = "cancelled"
    id: str
    step: int
    reason: CancelReason


class Error(_ServerMessage):
    type: Literal["error"] = "error"
    id: str | None
    code: str
    message: str
    field: str | None = Field(default=None, exclude_if=lambda value: value is None)


class Draining(_ServerMessage):
    type: Literal["draining"] = "draining"
    deadline_ms: int


Preview = Annotated[LatentPreview | ImagePreview, Field(discriminator="kind")]

ServerMessage = Annotated[
    Welcome
    | Accepted
    | Queued
    | Started
    | Progress
    | Preview
    | Complete
    | Cancelled
    | Error
    | Draining,
    Field(discriminator="type"),
]

#: Server messages a slow reader may miss: only the newest per (job, type) matters.
DROPPABLE_TYPES = frozenset({"queued", "progress", "preview"})

#: Terminal messages: exactly one per accepted job, and nothing about the job after it.
TERMINAL_TYPES = frozenset({"complete", "cancelled", "error"})
