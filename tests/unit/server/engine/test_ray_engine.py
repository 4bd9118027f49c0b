"""Unit tests for latentcast.server.engine.ray_engine, without a Ray cluster.

``EngineActor`` is a plain class until Ray makes it an actor: here it runs on the test's
thread with the real tiny model. What it sends back must be what the front end forwards
(encoded images), and one job's failure must not end the engine. The Ray side itself is
tested against a real cluster in tests/integration/test_ray_engines.py.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import pytest
from PIL import Image

from latentcast.server.config import ServerConfig
from latentcast.server.engine import JobFailed, JobFinished, JobSpec, JobStarted, JobStepped

from .support import make_request

ray_engine = pytest.importorskip(
    "latentcast.server.engine.ray_engine", reason="needs the latentcast[ray] extra"
)


@pytest.fixture(scope="module")
def actor(model_cache: Path) -> object:
    return ray_engine.EngineActor(
        ServerConfig(model="tiny", device="cpu", cache_dir=model_cache, cpu_threads=1)
    )


def run(actor: object, spec: JobSpec) -> list[object]:
    events = list(actor.add([spec]))  # type: ignore[attr-defined]
    for _ in range(spec.request.steps + 1):
        events += actor.step().events  # type: ignore[attr-defined]
    return events


def test_the_actor_describes_its_model(actor: object) -> None:
    facts, max_batch, pid = actor.describe()  # type: ignore[attr-defined]
    assert facts.name == "tiny" and facts.family == "sd1"
    assert max_batch == 8 and pid > 0
    assert pickle.loads(pickle.dumps(facts)) == facts


def test_finished_images_come_back_encoded_and_every_event_pickles(actor: object) -> None:
    request = make_request(steps=2, num_images=2)
    events = run(actor, JobSpec("a", request))
    kinds = [type(event) for event in events]
    assert kinds == [JobStarted, JobStepped, JobStepped, JobFinished], kinds
    finished = events[-1]
    assert finished.images == [] and finished.results is not None
    assert [result.seed for result in finished.results] == [request.seed, request.seed + 1]
    image = Image.open(io.BytesIO(finished.results[0].data))
    assert image.format == "PNG" and image.size == (request.width, request.height)
    for event in events:  # what Ray sends back to the front end
        assert type(pickle.loads(pickle.dumps(event))) is type(event)


def test_a_job_whose_images_cannot_be_encoded_fails_alone(
    actor: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr("latentcast.server.engine.worker.encode_results", broken)
    events = run(actor, JobSpec("b", make_request(steps=1)))
    assert isinstance(events[-1], JobFailed) and "disk on fire" in events[-1].message
    monkeypatch.undo()
    assert isinstance(run(actor, JobSpec("c", make_request(steps=1)))[-1], JobFinished)


def test_why_an_actor_is_gone_is_one_line() -> None:
    died = RuntimeError(
        "The actor died because of an error raised in its creation task, \x1b[36mray::"
        "EngineActor.__init__()\x1b[39m (pid=1)\n  File x, line 1\nModelLoadError: no model"
    )
    assert ray_engine._why(died) == "ModelLoadError: no model"
    assert ray_engine._why(RuntimeError("The actor is unavailable\nmore")) == (
        "The actor is unavailable"
    )
    assert ray_engine._why(RuntimeError("")) == "RuntimeError"
