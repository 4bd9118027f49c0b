"""Model building and loading for the latentcast server.

This package turns a ``--model`` spec into a ready-to-run :class:`LoadedModel`:

* ``"tiny"``, ``"tiny-sdxl"``, ``"tiny-inpaint"``: tiny, randomly initialised but
  structurally real Stable Diffusion pipelines (real diffusers/transformers classes,
  VAE scale factor 8, four latent channels). Each is built in-process, saved once into
  the cache directory and then loaded through exactly the same ``from_pretrained``
  path as a real diffusers folder. They need no network and run fast on a CPU, which
  makes them the models for tests, CI and demos. ``tiny`` is SD 1.x, ``tiny-sdxl`` is
  SDXL (two text encoders, micro-conditioning), ``tiny-inpaint`` is SD 1.x with a
  9-channel inpainting UNet.
* a local diffusers folder (``from_pretrained``, local files only);
* a local ``.safetensors`` / ``.ckpt`` single-file checkpoint (original LDM/ComfyUI
  key layout), fully offline when a diffusers config folder is given
  (``model_config``);
* anything else is treated as a Hugging Face Hub model id.

On top of the loaded pipeline it provides: the architecture family (detected from
the pipeline itself), per-mode pipelines that share one copy of the weights,
schedulers by name, LoRA adapters chosen per job and an optional tiny preview
decoder (TAESD).

Heavy imports (diffusers, transformers) are done lazily inside the functions that
need them, so importing this package (for example for :class:`LatentRGB`) is cheap.
"""

from __future__ import annotations

from .devices import default_dtype, resolve_device
from .errors import ModelLoadError
from .families import SD1_FAMILY, SD2_FAMILY, SDXL_FAMILY, LatentRGB, ModelFamily, detect_family
from .loaded import LoadedModel
from .loading import load_model
from .modes import IMG2IMG, INPAINT, MODES, TXT2IMG
from .schedulers import available_schedulers
from .tiny import (
    TINY_INPAINT_MODEL_NAME,
    TINY_MODEL_NAME,
    TINY_MODEL_NAMES,
    TINY_MODEL_VERSION,
    TINY_SDXL_MODEL_NAME,
    build_tiny_inpaint_pipeline,
    build_tiny_pipeline,
    build_tiny_sdxl_pipeline,
    build_tiny_tokenizer,
    default_cache_dir,
    tiny_model_dir,
)

__all__ = [
    "IMG2IMG",
    "INPAINT",
    "MODES",
    "SD1_FAMILY",
    "SD2_FAMILY",
    "SDXL_FAMILY",
    "TINY_INPAINT_MODEL_NAME",
    "TINY_MODEL_NAME",
    "TINY_MODEL_NAMES",
    "TINY_MODEL_VERSION",
    "TINY_SDXL_MODEL_NAME",
    "TXT2IMG",
    "LatentRGB",
    "LoadedModel",
    "ModelFamily",
    "ModelLoadError",
    "available_schedulers",
    "build_tiny_inpaint_pipeline",
    "build_tiny_pipeline",
    "build_tiny_sdxl_pipeline",
    "build_tiny_tokenizer",
    "default_cache_dir",
    "default_dtype",
    "detect_family",
    "load_model",
    "resolve_device",
    "tiny_model_dir",
]
