"""Devices and dtypes: resolving ``--device`` and parsing ``--dtype``."""

from __future__ import annotations

import torch

_DTYPES: tuple[tuple[str, torch.dtype], ...] = (
    ("float16", torch.float16),
    ("bfloat16", torch.bfloat16),
    ("float32", torch.float32),
)


def resolve_device(spec: str) -> torch.device:
    """Turn a device spec into an available :class:`torch.device`.

    ``"auto"`` picks cuda, then mps, then cpu. Explicit specs ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` and ``"mps"`` are checked for availability.

    Raises:
        ValueError: the spec is malformed, of an unsupported type, or not available
            on this machine.
    """
    text = spec.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(
            f"invalid device {spec!r}: expected 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"
        ) from exc
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {spec!r} requested but CUDA is not available "
                "(no NVIDIA GPU, or this torch build has no CUDA support); use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(
                f"device {spec!r} requested but only {count} CUDA device(s) exist "
                f"(valid: cuda:0..cuda:{count - 1})"
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise ValueError(
                f"device {spec!r} requested but Apple MPS is not available; use --device cpu"
            )
        return device
    raise ValueError(
        f"unsupported device type {device.type!r} in {spec!r}: "
        "use 'auto', 'cpu', 'cuda[:N]' or 'mps'"
    )


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def default_dtype(device: torch.device) -> torch.dtype:
    """float16 on cuda and mps, float32 elsewhere (cpu half precision is slow)."""
    if device.type in ("cuda", "mps"):
        return torch.float16
    return torch.float32


def _parse_dtype(name: str) -> torch.dtype:
    for key, value in _DTYPES:
        if name == key:
            return value
    known = ", ".join(key for key, _ in _DTYPES)
    raise ValueError(f"unknown dtype {name!r}; expected one of: {known}")
