"""The server's one typed, frozen configuration object.

Everything a running server needs to know is resolved here, once: the command line and
the ``LATENTCAST_*`` environment are turned into a :class:`ServerConfig` by ``cli.py``;
tests build one directly. Nothing else reads the environment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from latentcast.protocol import Limits

LogLevel = Literal["debug", "info", "warning", "error"]

#: Most a connection may have waiting to be sent before it counts as not reading.
DEFAULT_MAX_PENDING_MESSAGES = 1024

#: A name of a model (``--model NAME=SPEC``) or of a LoRA (``--lora NAME=PATH``).
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class ModelSpec:
    """One ``--model``: the name jobs choose it by and what to load."""

    name: str
    spec: str

    @classmethod
    def parse(cls, option: str) -> ModelSpec:
        """``NAME=SPEC``, or a bare SPEC named by itself (as before several models).

        A part before the first ``=`` that is not a valid name (a path, a hub id with a
        ``/``) makes the whole option a bare SPEC.
        """
        name, sep, spec = option.partition("=")
        if sep and spec and NAME_PATTERN.fullmatch(name):
            return cls(name, spec)
        return cls(option, option)


class ServerConfig(BaseModel):
    """Options of ``latentcast serve`` (PROTOCOL.md section 9, plus a few of our own)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    #: ``--model``, repeatable: each a SPEC or NAME=SPEC (:class:`ModelSpec`); the
    #: first is the default model. A single string is read as one model.
    model: tuple[str, ...] = ("tiny",)
    #: How many models stay loaded at once; None: all of them.
    max_resident_models: int | None = Field(default=None, ge=1)
    device: str = "auto"
    dtype: Literal["float16", "bfloat16", "float32"] | None = None
    cache_dir: Path | None = None
    #: For a single-file checkpoint: a local diffusers folder (or "tiny", "tiny-sdxl")
    #: whose configs describe it, so that loading never reaches for a hub.
    checkpoint_config: str | None = None
    #: LoRA adapters loaded at start, as NAME=PATH; jobs select them by name.
    loras: tuple[str, ...] = ()
    #: ControlNets loaded with the model, as NAME=PATH; jobs name them in params.controls.
    controlnets: tuple[str, ...] = ()
    #: An AutoencoderTiny (TAESD) folder that makes image previews real decodes.
    preview_decoder: Path | None = None
    tokens: tuple[str, ...] = ()
    allow_origins: tuple[str, ...] = ()
    max_queue: int = Field(default=64, ge=1)
    max_connections: int = Field(default=1000, ge=1)
    drain_timeout: float = Field(default=30.0, ge=0)
    send_timeout: float = Field(default=30.0, gt=0)
    #: How long a resumable session outlives its connection (PROTOCOL.md section 2a):
    #: its jobs go on, and a resume within this many seconds takes it over again.
    resume_window: float = Field(default=30.0, gt=0)
    #: At most this long for each connection to take what is buffered before the 1001 close.
    close_grace: float = Field(default=5.0, ge=0, le=5.0)
    max_jobs_per_session: int = Field(default=8, ge=1)
    max_width: int = Field(default=1024, ge=64)
    max_height: int = Field(default=1024, ge=64)
    max_steps: int = Field(default=150, ge=1)
    max_images: int = Field(default=4, ge=1)
    max_prompt_chars: int = Field(default=2000, ge=0)
    #: 32 MiB, not the protocol model's 64 MiB: the largest result the default limits
    #: allow (largest_result_bytes(), ~24 MiB at 1024x1024 x 4 images) fits, and websockets
    #: receives each frame in one event-loop callback (it copies the payload out of its
    #: buffer and unmasks it) that our decoder cannot pace: on a 2-core CPU 16-23 ms at
    #: 32 MiB, 62-98 ms at 64 MiB (more than in proportion). At 32 MiB /health and the loop
    #: stayed under issue 8's 100 ms goal (at most 68 ms) and so did another session's
    #: progress in the full benchmark runs (71 ms; one 120 ms outlier in nine runs); at
    #: 64 MiB it did not (up to 179 ms). docs/benchmarks.md, "Hostile frames".
    max_message_bytes: int = Field(default=32 * 2**20, ge=64 * 2**10)
    max_bad_frames: int = Field(default=16, ge=1)
    max_pending_messages: int = Field(default=DEFAULT_MAX_PENDING_MESSAGES, ge=16)
    #: Rows of one UNet call shared by running jobs (one per image, two with guidance);
    #: 1 runs one job at a time. None: the device's default (engine/batching.py).
    max_batch: int | None = Field(default=None, ge=1)
    #: torch threads for the engine on a CPU device; None: torch's own default (a
    #: thread per physical core), the speed of the pipeline called directly.
    cpu_threads: int | None = Field(default=None, ge=1)
    #: Engine cores in Ray actors (one per GPU, one per CPU slot on a CPU device), each
    #: loading the model in its own process; 0: the embedded engine in this process,
    #: which needs no Ray. With ray_address and no count: one.
    engines: int = Field(default=0, ge=0)
    #: A running Ray cluster to place the engines on ("auto", "ray://HOST:10001", ...);
    #: without it, engines start a local Ray runtime that the server stops at exit.
    ray_address: str | None = None
    log_level: LogLevel = "info"

    @field_validator("model", mode="before")
    @classmethod
    def _one_model_is_a_string(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("model")
    @classmethod
    def _model_names_are_unique(cls, models: tuple[str, ...]) -> tuple[str, ...]:
        if not models:
            raise ValueError("at least one model is needed")
        names: set[str] = set()
        for option in models:
            model = ModelSpec.parse(option)
            if not model.spec:
                raise ValueError("a model spec may not be empty")
            if model.name in names:
                raise ValueError(f"model name {model.name!r} is given twice")
            names.add(model.name)
        return models

    @model_validator(mode="after")
    def _ray_engines_serve_one_model(self) -> ServerConfig:
        if self.ray_engines and len(self.model) > 1:
            raise ValueError(
                "--engines / --ray-address serve one model for now: give a single --model "
                f"(got {len(self.model)})"
            )
        return self

    @property
    def models(self) -> tuple[ModelSpec, ...]:
        """Every ``--model``, parsed; the default first."""
        return tuple(ModelSpec.parse(option) for option in self.model)

    @property
    def default_model(self) -> ModelSpec:
        return self.models[0]

    @property
    def resident_models(self) -> int:
        """How many models may be loaded at once (``--max-resident-models``, at most all)."""
        count = len(self.model)
        return min(count, self.max_resident_models or count)

    @field_validator("tokens")
    @classmethod
    def _no_empty_tokens(cls, tokens: tuple[str, ...]) -> tuple[str, ...]:
        if any(not token for token in tokens):
            raise ValueError("a token may not be empty")
        return tokens

    @field_validator("loras")
    @classmethod
    def _loras_are_name_equals_path(cls, loras: tuple[str, ...]) -> tuple[str, ...]:
        return _names_equal_paths(loras, "LoRA")

    @field_validator("controlnets")
    @classmethod
    def _controlnets_are_name_equals_path(cls, controlnets: tuple[str, ...]) -> tuple[str, ...]:
        return _names_equal_paths(controlnets, "ControlNet")

    def lora_paths(self) -> dict[str, Path]:
        """The --lora options as {name: path}."""
        return {name: Path(path) for name, _, path in (lora.partition("=") for lora in self.loras)}

    def controlnet_paths(self) -> dict[str, Path]:
        """The --controlnet options as {name: path}."""
        return {
            name: Path(path) for name, _, path in (item.partition("=") for item in self.controlnets)
        }

    @property
    def ray_engines(self) -> int:
        """How many engines run in Ray actors; 0 for the embedded engine."""
        return self.engines or (1 if self.ray_address is not None else 0)

    def model_arguments(self, name: str | None = None) -> dict[str, Any]:
        """Keyword arguments of ``load_model(spec, ...)`` for the model ``name`` (the
        default one when None): the same model wherever an engine loads it (this process,
        a Ray actor). ``--model-config``, ``--lora`` and ``--preview-decoder`` belong to
        the default model. ``--controlnet`` goes to every model: with several models each
        one takes the ControlNets of its family and leaves the others out."""
        shared: dict[str, Any] = {
            "device": self.device,
            "dtype": self.dtype,
            "cache_dir": self.cache_dir,
            "controlnets": self.controlnet_paths(),
            "skip_other_families": len(self.model) > 1,
        }
        if name is not None and name != self.default_model.name:
            return shared
        return {
            **shared,
            "model_config": self.checkpoint_config,
            "loras": self.lora_paths(),
            "preview_decoder": self.preview_decoder,
        }

    @field_validator("allow_origins")
    @classmethod
    def _origins_are_urls(cls, origins: tuple[str, ...]) -> tuple[str, ...]:
        for origin in origins:
            if "://" not in origin or origin.endswith("/"):
                raise ValueError(
                    f"allowed origin {origin!r} must look like scheme://host[:port], "
                    "without a trailing slash"
                )
        return origins

    def limits(self) -> Limits:
        """The limits announced in ``welcome`` and enforced on every submit."""
        return Limits(
            max_width=self.max_width,
            max_height=self.max_height,
            max_steps=self.max_steps,
            max_images=self.max_images,
            max_prompt_chars=self.max_prompt_chars,
            max_jobs_per_session=self.max_jobs_per_session,
            max_message_bytes=self.max_message_bytes,
            max_bad_frames=self.max_bad_frames,
        )

    def largest_result_bytes(self) -> int:
        """A bound on the size of the largest ``complete`` this configuration can produce.

        Encoded images of noise can be larger than their raw pixels (JPEG at quality 100
        especially), so the bound allows twice the raw size plus the map's own overhead.
        """
        raw = self.max_width * self.max_height * 3
        return self.max_images * (2 * raw + 1024) + 4096


def _names_equal_paths(items: tuple[str, ...], what: str) -> tuple[str, ...]:
    """Check NAME=PATH options (--lora, --controlnet): valid, distinct names."""
    names = set()
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"{what} {item!r} must look like NAME=PATH")
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", name):
            raise ValueError(f"{what} name {name!r} may use only letters, digits, '.', '_', '-'")
        if name in names:
            raise ValueError(f"{what} name {name!r} is given twice")
        names.add(name)
    return items
