"""Prometheus metrics of one server instance (served at GET /metrics).

Each :class:`Metrics` has its own registry, so several servers in one process (tests)
never share counters, and nothing lives at module level.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# Job outcomes, the label values of ``latentcast_jobs_total``.
OUTCOMES = ("complete", "cancelled", "failed", "shutdown", "rejected")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge(
            "latentcast_connections", "Open WebSocket sessions.", registry=self.registry
        )
        self.queue_depth = Gauge(
            "latentcast_queue_depth", "Jobs waiting for the engine.", registry=self.registry
        )
        self.jobs_running = Gauge(
            "latentcast_jobs_running", "Jobs on the engines now.", registry=self.registry
        )
        # Per engine ("local" for the embedded one, "ray-0", ... for Ray actors).
        self.engine_alive = Gauge(
            "latentcast_engine_alive",
            "1 while the engine answers, 0 while it is lost (being restarted) or could not load "
            "the model at start (left out for good).",
            ["engine"],
            registry=self.registry,
        )
        self.engine_jobs_running = Gauge(
            "latentcast_engine_jobs_running",
            "Jobs running on the engine now.",
            ["engine"],
            registry=self.registry,
        )
        self.engine_steps = Counter(
            "latentcast_engine_steps",
            "UNet calls the engine made (one per step, more when a failing batch is split); "
            "rate() is steps per second.",
            ["engine"],
            registry=self.registry,
        )
        self.engine_rows = Counter(
            "latentcast_engine_unet_rows",
            "UNet rows the engine ran; over latentcast_engine_steps, rows per step.",
            ["engine"],
            registry=self.registry,
        )
        self.jobs = Counter(
            "latentcast_jobs",
            "Jobs by outcome (rejected: submits answered with an error).",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in OUTCOMES:
            self.jobs.labels(outcome=outcome)
        self.step_seconds = Histogram(
            "latentcast_step_seconds",
            "Wall time of one engine step of a group of jobs (its UNet calls, scheduler "
            "steps and decodes).",
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
            registry=self.registry,
        )
        self.unet_rows = Histogram(
            "latentcast_unet_rows",
            "Rows of one UNet call (one per image, two with guidance): how full batches are.",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.job_seconds = Histogram(
            "latentcast_job_seconds",
            "Wall time from started to complete (completed jobs only).",
            buckets=(0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "latentcast_queue_seconds",
            "Wall time from accepted to started.",
            buckets=(0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0),
            registry=self.registry,
        )
        self.bad_frames = Counter(
            "latentcast_bad_frames",
            "Client frames answered with bad_frame or unknown_type.",
            registry=self.registry,
        )
        self.slow_disconnects = Counter(
            "latentcast_slow_client_disconnects",
            "Sessions closed because they did not read within the send timeout.",
            registry=self.registry,
        )

        self.resumes = Counter(
            "latentcast_session_resumes",
            "Resumable sessions taken over by a new connection (PROTOCOL.md section 2a).",
            registry=self.registry,
        )
        self.resume_expiries = Counter(
            "latentcast_session_resume_expiries",
            "Resumable sessions ended because the resume window passed without a resume.",
            registry=self.registry,
        )
        # Per model (--model NAME=SPEC; the name of a bare SPEC is the spec).
        self.model_resident = Gauge(
            "latentcast_model_resident",
            "1 while the model is loaded on the engine, 0 while it is not.",
            ["model"],
            registry=self.registry,
        )
        self.model_load_seconds = Gauge(
            "latentcast_model_load_seconds",
            "Wall time of the model's last load (loading, then making its engine core).",
            ["model"],
            registry=self.registry,
        )
        self.model_loads = Counter(
            "latentcast_model_loads",
            "Loads of the model (the one at start included).",
            ["model"],
            registry=self.registry,
        )
        self.model_load_failures = Counter(
            "latentcast_model_load_failures",
            "Loads of the model that failed (its waiting jobs ended with generation_failed).",
            ["model"],
            registry=self.registry,
        )
        self.model_unloads = Counter(
            "latentcast_model_unloads",
            "Unloads of the model, to make room for another (--max-resident-models).",
            ["model"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
