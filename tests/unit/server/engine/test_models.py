"""Unit tests for latentcast.server.engine.models: ModelResidency, the choice of the
model to unload (pure), and memory_in_use."""

from __future__ import annotations

import pytest
import torch

from latentcast.server.engine.models import ModelResidency, memory_in_use


def test_models_are_resident_least_recently_used_first() -> None:
    residency = ModelResidency(capacity=3)
    for name in ("a", "b", "c"):
        residency.add(name)
    assert residency.resident == ("a", "b", "c")
    assert len(residency) == 3 and "b" in residency and "d" not in residency
    residency.acquire("a")  # a job started on a: now the most recently used
    assert residency.resident == ("b", "c", "a")


def test_the_victim_is_the_least_recently_used_idle_model() -> None:
    residency = ModelResidency(capacity=3)
    for name in ("a", "b", "c"):
        residency.add(name)
    assert residency.victim() == "a"
    residency.acquire("a")
    residency.release("a")
    assert residency.victim() == "b", "a was used since"
    assert residency.victim(keep={"b"}) == "c"


def test_a_model_with_jobs_is_never_the_victim() -> None:
    residency = ModelResidency(capacity=2)
    residency.add("a")
    residency.add("b")
    residency.acquire("a")
    residency.acquire("b")
    residency.acquire("b")
    assert residency.victim() is None
    assert residency.least_recently_used() == "a"
    assert residency.least_recently_used(keep={"a"}) == "b"
    residency.release("b")
    assert residency.victim() is None, "b still has a job"
    assert residency.jobs("b") == 1 and residency.busy("b")
    residency.release("b")
    assert residency.victim() == "b"
    assert not residency.busy("b")
    with pytest.raises(ValueError, match="has 1 jobs"):
        residency.remove("a")
    residency.remove("b")
    assert residency.resident == ("a",)


def test_jobs_only_on_loaded_models_and_releases_only_of_jobs() -> None:
    residency = ModelResidency(capacity=1)
    with pytest.raises(ValueError, match="not loaded"):
        residency.acquire("a")
    residency.add("a")
    with pytest.raises(ValueError, match="no job"):
        residency.release("a")
    with pytest.raises(ValueError, match="at least 1"):
        ModelResidency(capacity=0)


def test_memory_in_use_on_cpu_is_the_process_resident_set() -> None:
    import psutil

    in_use = memory_in_use(torch.device("cpu"))
    assert in_use is not None
    # The same measure, taken just after: within a few MiB of each other.
    assert abs(in_use - psutil.Process().memory_info().rss) < 64 * 2**20
