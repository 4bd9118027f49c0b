"""The engine: a step-wise core that batches jobs, its thread, and its event-loop bridge.

* :mod:`.core` — :class:`EngineCore`: prepare, one batched denoising step per call,
  decode; plain data in and out (:mod:`.events`).
* :mod:`.prepare`, :mod:`.denoise`, :mod:`.decode` — its phases; :mod:`.prompts` — the
  prompt-embedding cache; :mod:`.batching` — which jobs share a UNet call, admission.
* :mod:`.thread` — :class:`EngineThread`, the one thread that touches the model.
* :mod:`.models` — :class:`ModelSet`, several models on that thread: one core per loaded
  model, loads on a loader thread, the least recently used idle model unloaded to make
  room (:class:`ModelResidency`, the pure choice).
* :mod:`.facts` — :class:`ModelFacts`, the model as the front end sees it (plain data).
* :mod:`.handle` — :class:`EngineHandle`, the front end's handle on one engine core;
  :mod:`.local` — :class:`LocalEngine`, the core on this process's engine thread.
* :mod:`.worker` — :class:`EngineWorker`, the engine loop on the event loop.
"""

from .batching import BatchPolicy, GroupKey, default_max_batch
from .core import EngineCore
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
from .facts import ModelFacts, group_key
from .handle import EngineHandle, EngineLost
from .local import LocalEngine
from .models import ModelEvent, ModelResidency, ModelSet
from .prepare import PreparedJob, diffusers_arguments, prepare
from .prompts import PROMPT_CACHE_SIZE, PromptCache, PromptKey, uses_guidance
from .thread import EngineThread
from .worker import EngineWorker, encode_results

__all__ = [
    "PROMPT_CACHE_SIZE",
    "BatchPolicy",
    "EngineCore",
    "EngineEvent",
    "EngineHandle",
    "EngineLost",
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
    "LocalEngine",
    "ModelEvent",
    "ModelFacts",
    "ModelResidency",
    "ModelSet",
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
