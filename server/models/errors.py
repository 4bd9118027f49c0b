"""The error a model that cannot be loaded is reported with."""

from __future__ import annotations


class ModelLoadError(Exception):
    """A model spec (or a LoRA / preview decoder given with it) could not be loaded."""
