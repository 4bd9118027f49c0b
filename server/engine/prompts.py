"""Prompt embeddings, computed once per (model, text, LoRA selection) and kept (LRU)."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

from ..jobs import GenerationRequest
from ..models import LoadedModel
from .batching import guided

#: Prompt encodings kept by :class:`PromptCache`. A canvas session resubmits the same
#: prompt many times a second, and a handful of sessions rarely juggle more than a few
#: prompts each; an entry is small (SD 1.x: 2 x 77 x 768 values, SDXL: 2 x 77 x 2048
#: plus pooled; 64 SDXL entries in float16 hold about 40 MB of device memory).
PROMPT_CACHE_SIZE = 64


@dataclass(frozen=True)
class PromptKey:
    """Everything a pipeline's ``encode_prompt`` output depends on, for one model."""

    model: str
    prompt: str
    negative_prompt: str
    #: Classifier-free guidance on: the negative prompt is encoded too.
    guidance: bool
    #: The job's LoRA selection: text-encoder LoRA layers change the embeddings.
    loras: tuple[tuple[str, float], ...]
    clip_skip: int | None = None


class PromptCache:
    """Prompt embeddings, least recently used first out, at most ``size`` entries.

    Engine thread only (no locks). :meth:`embeddings` gives what the pipeline's own
    ``encode_prompt`` computes from the text for one image (``prompt_embeds``,
    ``negative_prompt_embeds`` and, for SDXL, the pooled pair), with the arguments its
    ``__call__`` would use, so images made from them are byte-identical to a
    text-prompt call.
    """

    def __init__(self, size: int = PROMPT_CACHE_SIZE) -> None:
        self.size = size
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[PromptKey, dict[str, torch.Tensor | None]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    @staticmethod
    def key(model: LoadedModel, pipeline: Any, request: GenerationRequest) -> PromptKey:
        return PromptKey(
            model=model.name,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            guidance=uses_guidance(pipeline, request.guidance_scale),
            loras=tuple((str(name), float(scale)) for name, scale in request.loras),
        )

    def embeddings(
        self, model: LoadedModel, pipeline: Any, request: GenerationRequest
    ) -> dict[str, torch.Tensor | None]:
        """``prompt_embeds`` & co. for ``request`` (its LoRAs already active)."""
        key = self.key(model, pipeline, request)
        entry = self._entries.get(key)
        if entry is not None:
            self.hits += 1
            self._entries.move_to_end(key)
            return dict(entry)
        self.misses += 1
        entry = _encode_prompt(pipeline, key)
        self._entries[key] = entry
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return dict(entry)


def uses_guidance(pipeline: Any, guidance_scale: float) -> bool:
    """The pipelines' ``do_classifier_free_guidance`` rule for ``guidance_scale``."""
    return guided(guidance_scale, embedded=pipeline.unet.config.time_cond_proj_dim is not None)


def _encode_prompt(pipeline: Any, key: PromptKey) -> dict[str, torch.Tensor | None]:
    """What ``pipeline.__call__`` would compute from the text (diffusers 0.42)."""
    common: dict[str, Any] = {
        "prompt": key.prompt,
        "device": pipeline._execution_device,
        "num_images_per_prompt": 1,
        "do_classifier_free_guidance": key.guidance,
        "negative_prompt": key.negative_prompt,
        "lora_scale": None,  # the pipelines' default (no cross_attention_kwargs scale)
        "clip_skip": key.clip_skip,
    }
    with torch.no_grad():
        encoded = pipeline.encode_prompt(**common)
    names = ["prompt_embeds", "negative_prompt_embeds"]
    if len(encoded) == 4:  # SDXL: both text encoders' pooled outputs too
        names += ["pooled_prompt_embeds", "negative_pooled_prompt_embeds"]
    return dict(zip(names, encoded, strict=True))


def prompt_warnings(pipeline: Any, request: GenerationRequest) -> list[str]:
    """Say so when a prompt is longer than the text encoder's window (it is cut there)."""
    tokenizer = pipeline.tokenizer
    window = tokenizer.model_max_length
    warnings = []
    for field, text in (
        ("prompt", request.prompt),
        ("negative_prompt", request.negative_prompt),
    ):
        count = len(tokenizer(text).input_ids)
        if count > window:
            warnings.append(
                f"{field} is {count - 2} tokens; the text encoder reads the first "
                f"{window - 2} and ignored the last {count - window}"
            )
    return warnings
