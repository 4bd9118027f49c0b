"""load_model: from a ``--model`` spec (tiny name, folder, single file, hub id) to a
:class:`LoadedModel`, and the sources a pipeline is loaded from."""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from .controlnets import _load_controlnets
from .devices import _parse_dtype, default_dtype, resolve_device
from .errors import ModelLoadError
from .families import SDXL_FAMILY, _sample_size, detect_family
from .loaded import LoadedModel
from .loras import _load_loras
from .modes import (
    _INPAINT_UNET_CHANNELS,
    _SAFETY_CHECKER_KWARGS,
    _SD_PIPELINES,
    _SDXL_PIPELINES,
    INPAINT,
    MODES,
)
from .preview_decoder import _load_preview_decoder
from .schedulers import _DEFAULT_SCHEDULER, available_schedulers
from .tiny import TINY_MODEL_NAMES, _is_complete_pipeline_dir, default_cache_dir, tiny_model_dir

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

_SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


def load_model(
    spec: str,
    *,
    name: str | None = None,
    device: str = "auto",
    dtype: str | None = None,
    cache_dir: Path | None = None,
    model_config: str | Path | None = None,
    loras: Mapping[str, Path] = MappingProxyType({}),
    preview_decoder: Path | None = None,
    controlnets: Mapping[str, Path] = MappingProxyType({}),
    skip_other_families: bool = False,
) -> LoadedModel:
    """Load a Stable Diffusion 1.x / 2.x / SDXL model from ``spec``.

    ``spec`` may be:

    * ``"tiny"``, ``"tiny-sdxl"``, ``"tiny-inpaint"``: a built-in tiny model (built
      into ``cache_dir`` on first use, then loaded like any diffusers folder);
    * an existing diffusers folder: ``from_pretrained(folder, local_files_only=True)``
      with the pipeline class its ``model_index.json`` names;
    * an existing ``.safetensors`` / ``.ckpt`` file in the original (LDM, ComfyUI,
      A1111) layout: ``from_single_file``. ``model_config`` names the diffusers folder
      (or a tiny model name) whose configs, tokenizers and scheduler describe the
      checkpoint; with it, loading never reaches a hub. Without it diffusers fetches
      the matching config from the Hub, which is refused while ``HF_HUB_OFFLINE`` is
      set. ``model_config`` is ignored for every other kind of spec;
    * otherwise a Hugging Face Hub model id (honours ``HF_HUB_OFFLINE`` /
      ``TRANSFORMERS_OFFLINE`` read at call time: offline means the local HF cache only).

    ``name`` is the model's name (``--model NAME=SPEC``); by default ``spec`` itself.

    ``dtype`` is ``"float16"``, ``"bfloat16"``, ``"float32"`` or ``None`` for
    :func:`default_dtype` of the device. The pipeline is moved to the device, its
    progress bar disabled and its safety checker removed; the pipelines of the other
    modes are derived from it with ``from_pipe`` (shared weights).

    ``loras`` maps adapter names to LoRA files or folders (diffusers/kohya formats,
    anything ``load_lora_weights`` reads); they are loaded and left inactive
    (:meth:`LoadedModel.activate_loras`). ``preview_decoder`` is a local
    ``AutoencoderTiny`` (TAESD) folder whose latent channels match the model's.
    ``controlnets`` maps names to ControlNet folders or single files
    (:mod:`.controlnets`); each must be of the model's family, unless
    ``skip_other_families``, which leaves the others out (a server of several models
    offers each ControlNet on the models of its family).

    Raises:
        ValueError: bad ``device`` or ``dtype`` string, or device unavailable.
        ModelLoadError: the model, a LoRA, a ControlNet or the preview decoder could not
            be loaded, or a ControlNet is of another family.
    """
    with _without_torchvision_notice():
        return _load_model(
            spec,
            name=spec if name is None else name,
            device=device,
            dtype=dtype,
            cache_dir=cache_dir,
            model_config=model_config,
            loras=loras,
            preview_decoder=preview_decoder,
            controlnets=controlnets,
            skip_other_families=skip_other_families,
        )


def _load_model(
    spec: str,
    *,
    name: str,
    device: str,
    dtype: str | None,
    cache_dir: Path | None,
    model_config: str | Path | None,
    loras: Mapping[str, Path],
    preview_decoder: Path | None,
    controlnets: Mapping[str, Path],
    skip_other_families: bool,
) -> LoadedModel:
    torch_device = resolve_device(device)
    torch_dtype = _parse_dtype(dtype) if dtype is not None else default_dtype(torch_device)
    cache = cache_dir if cache_dir is not None else default_cache_dir()

    pipeline: Any  # diffusers pipelines are dynamically typed (components set at runtime)
    if spec in TINY_MODEL_NAMES:
        pipeline = _from_pretrained_folder(_tiny_folder(spec, cache), torch_dtype)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            pipeline = _from_pretrained_folder(path, torch_dtype)
        elif path.is_file():
            if path.suffix.lower() not in _SINGLE_FILE_SUFFIXES:
                raise ModelLoadError(
                    f"the file {spec!r} is not a .safetensors or .ckpt checkpoint (pass one "
                    "of those, or a diffusers folder)"
                )
            _check_checkpoint_file(path)
            config_dir = _model_config_dir(model_config, cache) if model_config else None
            pipeline = _from_single_file(path, config_dir, torch_dtype)
        elif _looks_like_path(spec):
            raise ModelLoadError(
                f"no such file or folder: {spec!r}; pass an existing diffusers folder, a "
                ".safetensors/.ckpt file, a Hub model id, or one of "
                f"{', '.join(TINY_MODEL_NAMES)}"
            )
        else:
            pipeline = _from_hub(spec, torch_dtype)

    try:
        pipeline = pipeline.to(torch_device)
    except Exception as exc:
        raise ModelLoadError(f"could not move model {spec!r} to {torch_device}: {exc}") from exc
    if hasattr(pipeline, "safety_checker"):
        pipeline.safety_checker = None
    pipeline.set_progress_bar_config(disable=True)
    return _describe(
        name,
        pipeline,
        torch_device,
        torch_dtype,
        loras,
        preview_decoder,
        controlnets,
        skip_other_families=skip_other_families,
    )


def _tiny_folder(name: str, cache: Path) -> Path:
    try:
        return tiny_model_dir(cache, name)
    except Exception as exc:
        raise ModelLoadError(f"could not build the {name} model in {cache}: {exc}") from exc


def _model_config_dir(model_config: str | Path, cache: Path) -> Path:
    """The diffusers folder that ``--model-config`` names (a tiny name or a folder)."""
    if str(model_config) in TINY_MODEL_NAMES:
        return _tiny_folder(str(model_config), cache)
    folder = Path(model_config).expanduser()
    if not _is_complete_pipeline_dir(folder):
        raise ModelLoadError(
            f"model config {str(model_config)!r} is not a diffusers folder (no "
            "model_index.json there); pass the folder of a diffusers model of the same "
            f"architecture, or one of {', '.join(TINY_MODEL_NAMES)}"
        )
    return folder


def _describe(
    name: str,
    loaded: DiffusionPipeline,
    device: torch.device,
    dtype: torch.dtype,
    loras: Mapping[str, Path],
    preview_decoder: Path | None,
    controlnets: Mapping[str, Path],
    *,
    skip_other_families: bool = False,
) -> LoadedModel:
    import diffusers

    pipeline: Any = loaded
    family = detect_family(pipeline)
    vae_scale_factor = int(pipeline.vae_scale_factor)
    latent_channels = int(pipeline.vae.config.latent_channels)
    unet_channels = int(pipeline.unet.config.in_channels)
    inpaint_unet = unet_channels == _INPAINT_UNET_CHANNELS and latent_channels == 4
    if unet_channels != latent_channels and not inpaint_unet:
        raise ModelLoadError(
            f"model {name!r} is not supported: its UNet takes {unet_channels} input channels "
            f"but the VAE has {latent_channels} latent channels"
        )
    classes = _SDXL_PIPELINES if family is SDXL_FAMILY else _SD_PIPELINES
    modes = (INPAINT,) if inpaint_unet else MODES
    pipelines: dict[str, Any] = {}
    try:
        for mode in modes:
            cls = getattr(diffusers, classes[mode])
            if type(pipeline) is cls:
                pipelines[mode] = pipeline
            else:
                # dtype= matters: from_pipe otherwise casts the (shared!) modules to fp32.
                with _without_empty_fp32_warning():
                    derived = cls.from_pipe(pipeline, dtype=dtype)
                derived.set_progress_bar_config(disable=True)
                pipelines[mode] = derived
    except Exception as exc:
        raise ModelLoadError(
            f"could not build the {mode} pipeline for model {name!r} "
            f"({type(pipeline).__name__}): {exc}"
        ) from exc
    main = pipelines[modes[0]]
    # Captured before any job replaces the pipelines' scheduler (LoadedModel.make_scheduler).
    scheduler_config = MappingProxyType(copy.deepcopy(dict(pipeline.scheduler.config)))
    adapters = _load_loras(main, loras)
    decoder = _load_preview_decoder(preview_decoder, latent_channels, device, dtype)
    control_modules = _load_controlnets(
        controlnets,
        pipeline.unet,
        latent_channels,
        device,
        dtype,
        model_name=name,
        family=family.name,
        skip_other_families=skip_other_families,
    )
    model = LoadedModel(
        name=name,
        family=family,
        pipeline=main,
        device=device,
        dtype=dtype,
        latent_channels=latent_channels,
        vae_scale_factor=vae_scale_factor,
        schedulers=available_schedulers(),
        default_scheduler=_DEFAULT_SCHEDULER,
        default_size=_sample_size(pipeline) * vae_scale_factor,
        modes=modes,
        inpaint_unet=inpaint_unet,
        scheduler_config=scheduler_config,
        loras=tuple(sorted(adapters)),
        preview_decoder=decoder,
        controlnets=tuple(sorted(control_modules)),
        _pipelines=MappingProxyType(pipelines),
        _adapters=MappingProxyType(adapters),
        _controlnets=MappingProxyType(control_modules),
    )
    return model


class _DropRecords(logging.Filter):
    """Drops the log records whose message contains ``fragment``."""

    def __init__(self, fragment: str) -> None:
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextmanager
def _without_log_records(logger_name: str, fragment: str) -> Iterator[None]:
    """While the block runs, ``logger_name`` drops records that contain ``fragment``."""
    logger = logging.getLogger(logger_name)
    drop = _DropRecords(fragment)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _without_empty_fp32_warning() -> AbstractContextManager[None]:
    """No "modules ... should be kept in float32: []" warning from diffusers.

    diffusers 0.42 warns on every ``module.to(dtype)`` even when the list of modules
    to keep in float32 is empty (``[] is not None``), i.e. when there is nothing to
    warn about; ``from_pipe`` does such a cast for every module.
    """
    return _without_log_records("diffusers.models.modeling_utils", "should be kept in float32: []")


def _without_torchvision_notice() -> AbstractContextManager[None]:
    """No "`CLIPImageProcessor` requires torchvision" notices from transformers.

    Importing the diffusers pipelines names transformers' image processors (for the
    safety checker and IP-adapters); without torchvision, transformers 5 falls back to
    its PIL processors and says so once per class. latentcast never runs an image
    processor (no safety checker, no IP-adapter), so the notice only alarms users.
    """
    return _without_log_records("transformers.utils.import_utils", "requires torchvision")


def _looks_like_path(spec: str) -> bool:
    """True when ``spec`` cannot be a Hub id ("name" or "owner/name")."""
    if spec.startswith(("/", "./", "../", "~")) or "\\" in spec or spec in (".", ".."):
        return True
    if spec.lower().endswith(_SINGLE_FILE_SUFFIXES):
        return True
    return spec.count("/") > 1 or (len(spec) > 1 and spec[1] == ":")


def _hub_offline() -> bool:
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, Any]:
    import diffusers
    from packaging.version import Version

    # diffusers renamed torch_dtype -> dtype (the old name warns on new versions).
    dtype_key = "dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype"
    return {dtype_key: dtype}


def _pipeline_kwargs(pipeline_cls: Any) -> dict[str, Any]:
    """Constructor overrides: no safety checker (only for classes that have one)."""
    parameters = inspect.signature(pipeline_cls.__init__).parameters
    return {key: value for key, value in _SAFETY_CHECKER_KWARGS.items() if key in parameters}


def _low_cpu_mem_kwargs() -> dict[str, Any]:
    from diffusers.utils import is_accelerate_available

    # Without accelerate, low_cpu_mem_usage=True only warns and falls back.
    return {"low_cpu_mem_usage": is_accelerate_available()}


_SUPPORTED_PIPELINES = (*_SD_PIPELINES.values(), *_SDXL_PIPELINES.values())


def _pipeline_class(class_name: str | None, where: str) -> Any:
    """The diffusers class for a model_index ``_class_name`` we know how to run."""
    import diffusers

    if class_name not in _SUPPORTED_PIPELINES:
        raise ModelLoadError(
            f"{where} holds a {class_name or 'unknown'} pipeline; latentcast runs Stable "
            "Diffusion 1.x/2.x and SDXL pipelines (StableDiffusion[XL][Img2Img|Inpaint]Pipeline)"
        )
    return getattr(diffusers, str(class_name))


def _model_index_class(folder: Path) -> str | None:
    try:
        index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = index.get("_class_name") if isinstance(index, dict) else None
    return name if isinstance(name, str) else None


def _from_pretrained_folder(folder: Path, dtype: torch.dtype) -> DiffusionPipeline:
    class_name = _model_index_class(folder)
    if class_name is None:
        raise ModelLoadError(
            f"could not load a Stable Diffusion pipeline from folder {str(folder)!r}: "
            "no readable model_index.json (expected a diffusers folder with "
            "model_index.json, unet/, vae/, text_encoder/, tokenizer/)"
        )
    cls = _pipeline_class(class_name, f"folder {str(folder)!r}")
    try:
        loaded: DiffusionPipeline = cls.from_pretrained(
            str(folder),
            local_files_only=True,
            **_dtype_kwargs(dtype),
            **_low_cpu_mem_kwargs(),
            **_pipeline_kwargs(cls),
        )
    except Exception as exc:
        raise ModelLoadError(
            f"could not load a Stable Diffusion pipeline from folder {str(folder)!r}: {exc} "
            "(expected a diffusers folder with model_index.json, unet/, vae/, text_encoder/, "
            "tokenizer/)"
        ) from exc
    return loaded


def _check_checkpoint_file(path: Path) -> None:
    """Raise ModelLoadError unless ``path`` looks like a readable checkpoint file.

    Cheap (the safetensors header, or the first bytes of a .ckpt), so a corrupt or
    partial file is named as such before any config is looked for.
    """
    import zipfile

    problem: str | None = None
    if path.stat().st_size == 0:
        problem = "the file is empty"
    elif path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as exc:
            detail = str(exc).removeprefix("Error while deserializing header: ")
            problem = f"safetensors: {detail}"
    else:
        with path.open("rb") as handle:
            head = handle.read(2)
        # torch.save writes a zip archive; older checkpoints are a bare pickle (protocol 2+).
        if not zipfile.is_zipfile(path) and not (head[:1] == b"\x80" and head[1:2] >= b"\x02"):
            problem = "neither a zip archive nor a pickle, as torch.save writes them"
    if problem is not None:
        raise ModelLoadError(
            f"{str(path)!r} is not a valid checkpoint file ({problem}); expected the "
            "complete weights of a Stable Diffusion 1.x, 2.x or SDXL model as .safetensors "
            "or .ckpt (a partial download or a saved HTML page looks like this: download "
            "it again)"
        )


def _single_file_class(path: Path) -> Any:
    """SD or SDXL pipeline class for a checkpoint, guessed from its key names."""
    import diffusers

    keys: list[str] = []
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception as exc:
            raise ModelLoadError(f"could not read checkpoint file {str(path)!r}: {exc}") from exc
    # SDXL checkpoints keep their text encoders under "conditioner.embedders.N".
    if any(key.startswith("conditioner.embedders.") for key in keys):
        return diffusers.StableDiffusionXLPipeline
    return diffusers.StableDiffusionPipeline


def _from_single_file(path: Path, config_dir: Path | None, dtype: torch.dtype) -> DiffusionPipeline:
    if config_dir is not None:
        cls = _pipeline_class(_model_index_class(config_dir), f"model config {str(config_dir)!r}")
        try:
            with _without_empty_fp32_warning():
                loaded: DiffusionPipeline = cls.from_single_file(
                    str(path),
                    config=str(config_dir),
                    local_files_only=True,
                    **_dtype_kwargs(dtype),
                    **_pipeline_kwargs(cls),
                )
        except Exception as exc:
            raise ModelLoadError(
                f"could not load checkpoint file {str(path)!r} with the configs of "
                f"{str(config_dir)!r}: {type(exc).__name__}: {exc} (the model config must be "
                "a diffusers folder of the same architecture as the checkpoint)"
            ) from exc
        return loaded
    if _hub_offline():
        raise ModelLoadError(
            f"could not load checkpoint file {str(path)!r}: a single-file checkpoint holds "
            "only weights, and the configs describing it (UNet, VAE, text encoders, "
            "tokenizers, scheduler) would come from the Hugging Face Hub, which is disabled "
            "(HF_HUB_OFFLINE). Pass --model-config FOLDER with a local diffusers folder of "
            "the same architecture (e.g. the base model's), or convert the checkpoint to a "
            "diffusers folder and pass --model FOLDER"
        )
    cls = _single_file_class(path)
    try:
        with _without_empty_fp32_warning():
            guessed: DiffusionPipeline = cls.from_single_file(
                str(path), **_dtype_kwargs(dtype), **_pipeline_kwargs(cls)
            )
    except Exception as exc:
        raise ModelLoadError(
            f"could not load checkpoint file {str(path)!r}: {exc} (single-file loading needs "
            "the model's config from the Hugging Face Hub; pass --model-config FOLDER with a "
            "local diffusers folder of the same architecture to avoid that)"
        ) from exc
    return guessed


def _from_hub(model_id: str, dtype: torch.dtype) -> DiffusionPipeline:
    from diffusers import DiffusionPipeline

    offline = _hub_offline()
    try:
        # model_index.json first: picks the class (and refuses unsupported ones) before
        # any weights are fetched.
        index: Any = DiffusionPipeline.load_config(model_id, local_files_only=offline)
        class_name = index.get("_class_name") if isinstance(index, Mapping) else None
    except Exception as exc:
        reason = (
            "hub access is disabled (HF_HUB_OFFLINE) and it is not in the local Hugging Face cache"
            if offline
            else "the hub could not be reached or has no such model"
        )
        raise ModelLoadError(
            f"{model_id!r} is not a local folder or file, and {reason}; download it first "
            f"and pass --model PATH (details: {type(exc).__name__}: {exc})"
        ) from exc
    cls = _pipeline_class(class_name, f"hub model {model_id!r}")
    try:
        loaded: DiffusionPipeline = cls.from_pretrained(
            model_id,
            local_files_only=offline,
            **_dtype_kwargs(dtype),
            **_low_cpu_mem_kwargs(),
            **_pipeline_kwargs(cls),
        )
    except Exception as exc:
        raise ModelLoadError(
            f"loading {model_id!r} from the Hugging Face Hub{' cache' if offline else ''} "
            f"failed: {type(exc).__name__}: {exc}; download it first and pass --model PATH"
        ) from exc
    return loaded
