"""The engine: a step-wise core that batches jobs, its thread, and its event-loop bridge.

* :mod:`.core` — :class:`EngineCore`: prepare, one batched denoising step per call,
  decode; plain data in and out (:mod:`.events`).
* :mod:`.prepare`, :mod:`.denoise`, :mod:`.decode` — its phases; :mod:`.prompts` — the
  prompt-embedding cache; :mod:`.batching` — which jobs share a UNet call, admission.
* :mod:`.thread` — :class:`EngineThread`, the one thread that touches the model.
* :mod:`.worker` — :class:`EngineWorker`, the engine loop on the event loop.
"""

from .batching import BatchPolicy, GroupKey, default_max_batch
from .core import EngineCore, group_key
from .events import (
    EngineEvent,
    JobFailed,
    JobFinished,
    JobSpec,
    JobStarted,
    JobStepped,
    JobStopped,
    LatentSnapshot,
    StepReport,
)
from .prepare import PreparedJob, diffusers_arguments, prepare
from .prompts import PROMPT_CACHE_SIZE, PromptCache, PromptKey, uses_guidance
from .thread import EngineThread
from .worker import EngineWorker, encode_results

__all__ = [
    "PROMPT_CACHE_SIZE",
    "BatchPolicy",
    "EngineCore",
    "EngineEvent",
    "EngineThread",
    "EngineWorker",
    "GroupKey",
    "JobFailed",
    "JobFinished",
    "JobSpec",
    "JobStarted",
    "JobStepped",
    "JobStopped",
    "LatentSnapshot",
    "PreparedJob",
    "PromptCache",
    "PromptKey",
    "StepReport",
    "default_max_batch",
    "diffusers_arguments",
    "encode_results",
    "group_key",
    "prepare",
    "uses_guidance",
]
