"""Which jobs may share a UNet call, and when a waiting job may join the engine.

Pure rules, no torch: the event-loop side uses them to admit jobs, the core to group them.

* Jobs are **compatible** (one :class:`GroupKey`) when one UNet call can take them all:
  the same latent size, the same LoRA selection (adapters are active model-wide, so
  a call runs under one selection) and the same ControlNet selection (each ControlNet
  of it is called once for all the group's rows, each row with its own job's control
  image, scale and start/end; jobs without controls never pay for a ControlNet call).
  Mode, scheduler, guidance, prompt, strength and image count may differ: each row
  carries its own timestep and conditioning.
* A **group** is the compatible jobs in the engine; its rows (one per image, two with
  guidance) are at most ``max_batch`` in one UNet call. Groups take turns, one step each,
  so a job of another size joins at once as a group of its own instead of waiting for a
  batch to finish, and no group starves another.
* **Admission**, at step boundaries, in the fairness order of PROTOCOL.md 5.6: the next
  waiting job joins when its group has room for its rows, or when it can open a new
  group (fewer than ``max_groups``). The first job that cannot join stops admission
  (no overtaking: a big job is never starved by small ones). A job bigger than
  ``max_batch`` joins an empty engine and runs alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: Groups that may take turns at once. More interleaving makes every running job slower
#: (each steps once per round); four keeps a job of a fifth size waiting for at most the
#: end of one of them.
MAX_GROUPS = 4

#: ``--max-batch`` default (UNet rows per call) by device type. CPU: measured on a
#: 2-core machine with the tiny model (docs/benchmarks.md, "Step batching"): 8 rows is
#: 4 guided jobs or 8 unguided ones, where throughput has stopped growing. CUDA: a guess
#: until measured on a GPU (bench/bench_gpu.py): SD 1.5 at 512x512 keeps a datacentre GPU
#: busy from about 8 images (16 guided rows).
DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 16, "mps": 4}
FALLBACK_MAX_BATCH = 4


def default_max_batch(device_type: str) -> int:
    return DEFAULT_MAX_BATCH.get(device_type, FALLBACK_MAX_BATCH)


def guided(guidance_scale: float, *, embedded: bool) -> bool:
    """The pipelines' ``do_classifier_free_guidance`` rule: a scale above 1, unless the
    UNet takes the scale as an input (``embedded``, LCM-distilled) and needs no
    unconditional row."""
    return guidance_scale > 1 and not embedded


@dataclass(frozen=True)
class GroupKey:
    """What jobs must share to share a UNet call."""

    latent_height: int
    latent_width: int
    #: (adapter, scale) pairs, as the job selected them.
    loras: tuple[tuple[str, float], ...]
    #: The ControlNets the job names in params.controls, sorted (a name given twice is
    #: here twice: called twice). Scales, windows and images are per job.
    controlnets: tuple[str, ...] = ()
    #: The model's name: jobs of two models never share a call ("" inside one core).
    model: str = ""


@dataclass(frozen=True)
class BatchPolicy:
    """``max_batch`` rows per UNet call, ``max_groups`` groups taking turns.

    ``max_batch`` 1 runs one job at a time (one group), as PROTOCOL.md section 9 says.
    """

    max_batch: int
    max_groups: int = MAX_GROUPS

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")
        if self.max_batch == 1:
            object.__setattr__(self, "max_groups", 1)

    def admits(self, groups: Mapping[GroupKey, int], key: GroupKey, rows: int) -> bool:
        """Whether a job of ``rows`` rows in group ``key`` may join the engine now.

        ``groups`` is the rows of every group in the engine (jobs admitted this round
        included).
        """
        if not groups:
            return True
        held = groups.get(key)
        if held is None:
            return len(groups) < self.max_groups
        return held + rows <= self.max_batch
