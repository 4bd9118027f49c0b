"""ControlNets (``--controlnet NAME=PATH``): loading them beside a model, checking they fit.

A ControlNet is loaded once, with the model, onto the model's device and dtype. It must
belong to the model's family: its cross-attention width (768 for SD 1.x, 1024 for SD 2.x,
2048 for SDXL) and its added conditioning (SDXL's ``text_time``) must equal the UNet's,
and it must read the VAE's latent channels. Anything else is refused at start, naming
the option, rather than failing on the first job.

PATH is a diffusers ``ControlNetModel`` folder (``config.json`` and its weights) or a
single ``.safetensors`` / ``.ckpt`` / ``.pth`` file in the original layout. A single file holds no
config: a ``config.json`` in the same folder is used when there is one; otherwise
diffusers looks the config up in the local Hugging Face cache, which fails offline
(``HF_HUB_OFFLINE``) unless it was cached before.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import ModelLoadError

logger = logging.getLogger("latentcast.models")

#: ``limits.max_controls`` of a model that has ControlNets (0 without).
MAX_CONTROLS_PER_JOB = 3

#: Single files: the original ControlNet releases are ``.pth`` (lllyasviel's v1.1) or
#: ``.safetensors``; ``.ckpt`` as for models.
_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pth")


class ControlNetFamilyMismatch(ModelLoadError):
    """A ControlNet made for another family than the model's (SD 1.x, SD 2.x, SDXL)."""


def _load_controlnets(
    controlnets: Mapping[str, Path],
    unet: Any,
    latent_channels: int,
    device: torch.device,
    dtype: torch.dtype,
    *,
    model_name: str,
    family: str,
    skip_other_families: bool = False,
) -> dict[str, Any]:
    """Load every ControlNet of ``controlnets`` ({name: path}) for the model of ``unet``.

    Returns {name: ControlNetModel} on ``device`` in ``dtype``, in eval mode. With
    ``skip_other_families`` a ControlNet of another family is left out (logged) instead
    of refused: for a server whose models are of several families, where each offers
    the ControlNets of its own.

    Raises:
        ControlNetFamilyMismatch: a ControlNet of another family (unless skipped).
        ModelLoadError: a path that does not load.
    """
    from .loading import _without_empty_fp32_warning

    loaded: dict[str, Any] = {}
    for name in sorted(controlnets):
        path = Path(controlnets[name]).expanduser()
        where = f"--controlnet {name}={path}"
        module = _load_one(path, where)
        try:
            _check_family(
                module, unet, latent_channels, where, model_name=model_name, family=family
            )
        except ControlNetFamilyMismatch as exc:
            if not skip_other_families:
                raise
            logger.info("model %s: ControlNet %s left out: %s", model_name, name, exc)
            continue
        try:
            with _without_empty_fp32_warning():
                module = module.to(device=device, dtype=dtype).eval()
        except Exception as exc:
            raise ModelLoadError(f"{where}: could not move it to {device}: {exc}") from exc
        loaded[name] = module
    return loaded


def _load_one(path: Path, where: str) -> Any:
    """The ControlNet at ``path`` as saved (its dtype is set by the caller)."""
    from diffusers import ControlNetModel

    if path.is_dir():
        try:
            return ControlNetModel.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:
            raise ModelLoadError(
                f"{where}: could not load a ControlNet from this folder: "
                f"{type(exc).__name__}: {exc} (expected a diffusers ControlNetModel folder "
                "with config.json and its weights)"
            ) from exc
    if path.is_file():
        if path.suffix.lower() not in _SINGLE_FILE_SUFFIXES:
            raise ModelLoadError(
                f"{where}: not a .safetensors, .ckpt or .pth file, nor a diffusers ControlNet "
                "folder"
            )
        config = path.parent if (path.parent / "config.json").is_file() else None
        extra: dict[str, Any] = {"config": str(config)} if config is not None else {}
        try:
            return ControlNetModel.from_single_file(str(path), local_files_only=True, **extra)
        except Exception as exc:
            raise ModelLoadError(
                f"{where}: could not load this single-file ControlNet: "
                f"{type(exc).__name__}: {exc} (a single file holds no config: put the "
                "ControlNet's config.json beside it, or pass its diffusers folder)"
            ) from exc
    raise ModelLoadError(f"{where}: no such file or folder")


def _check_family(
    module: Any,
    unet: Any,
    latent_channels: int,
    where: str,
    *,
    model_name: str,
    family: str,
) -> None:
    """Refuse a ControlNet whose conditioning does not match the UNet's."""
    control = module.config
    model = unet.config
    mismatches = []
    if control.get("cross_attention_dim") != model.get("cross_attention_dim"):
        mismatches.append(
            f"cross-attention dim {control.get('cross_attention_dim')} "
            f"(the model's: {model.get('cross_attention_dim')})"
        )
    if control.get("addition_embed_type") != model.get("addition_embed_type"):
        mismatches.append(
            f"added conditioning {control.get('addition_embed_type')!r} "
            f"(the model's: {model.get('addition_embed_type')!r})"
        )
    if int(control.get("in_channels", latent_channels)) != latent_channels:
        mismatches.append(
            f"{control.get('in_channels')} input channels (the model's latents: {latent_channels})"
        )
    if mismatches:
        raise ControlNetFamilyMismatch(
            f"{where}: this ControlNet is not for model {model_name!r} ({family}): it has "
            f"{'; '.join(mismatches)}. A ControlNet works only with models of the family it "
            "was trained for (SD 1.x, SD 2.x or SDXL)"
        )
