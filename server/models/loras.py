"""LoRA adapters: loading them into a pipeline, and the active selection's state."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ModelLoadError


class _LoraState:
    """The adapter selection currently applied to the model's modules.

    Mutable on purpose (the modules it describes are mutable): lets
    :meth:`LoadedModel.activate_loras` skip the module walk when a job selects what
    is already active. ``None`` means unknown (an activation failed half way).
    """

    __slots__ = ("active",)

    def __init__(self) -> None:
        self.active: tuple[tuple[str, float], ...] | None = ()


def _load_loras(pipeline: Any, loras: Mapping[str, Path]) -> dict[str, str]:
    """Load every LoRA into ``pipeline``'s modules; return {name: adapter name}.

    Adapters get internal names ("lora0", "lora1", ... in sorted name order) because
    peft rejects some characters (".") that LoRA names may use. Every adapter is left
    disabled.
    """
    adapters: dict[str, str] = {}
    for index, name in enumerate(sorted(loras)):
        path = Path(loras[name]).expanduser()
        adapter = f"lora{index}"
        where = f"LoRA {name!r} from {str(path)!r}"
        if not path.exists():
            raise ModelLoadError(f"could not load {where}: no such file or folder")
        try:
            with warnings.catch_warnings():
                # peft warns about every adapter after the first: several are intended.
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                pipeline.load_lora_weights(str(path), adapter_name=adapter, local_files_only=True)
            present = {a for names in pipeline.get_list_adapters().values() for a in names}
        except Exception as exc:
            raise ModelLoadError(f"could not load {where}: {type(exc).__name__}: {exc}") from exc
        if adapter not in present:
            raise ModelLoadError(
                f"could not load {where}: it holds no LoRA weights for this model's "
                "UNet or text encoders (a LoRA for another architecture?)"
            )
        adapters[name] = adapter
    if adapters:
        try:
            pipeline.disable_lora()
        except Exception as exc:
            raise ModelLoadError(f"could not disable the loaded LoRAs: {exc}") from exc
    return adapters
