"""latentcast GPU benchmark: denoising steps/s of full-size SD 1.5 and SDXL, direct vs server.

Usage::

    python bench/bench_gpu.py [--model sd15|sdxl|both] [--section pairs|batching|both]
                              [--steps N] [--pairs N] [--size N] [--batches 1,2,4,8,16]
                              [--batch-steps N] [--quick] [--preview] [--cache-dir DIR]
                              [--device auto|cuda|cpu]

What it does, per model:

1. Builds the FULL-SIZE architecture with random weights (fixed seeds): the real SD 1.5
   UNet / CLIP ViT-L text encoder / VAE configs, or the real SDXL base UNet / CLIP ViT-L
   + OpenCLIP ViT-bigG text encoders / SDXL VAE configs, written below as literal dicts
   (nothing is downloaded). The weights are random, the FLOPs are the real ones. The
   tokenizers are the project's small local CLIP tokenizer (its ids are all inside the
   49408-token vocabulary). fp16 on CUDA, fp32 on CPU. The build runs in a child process
   (so its memory is returned before the server loads the model) and is saved with
   ``save_pretrained`` into ``--cache-dir`` (default: a folder in the temp dir), where a
   later run finds and reuses it.
2. Starts an in-process :class:`~latentcast.server.app.Server` with ``model=FOLDER``: the
   real loading path (``--model FOLDER``), on loopback, with ``max_batch`` (UNet rows per
   step) at least 32 and twice the largest batch of step 5.
3. (section "pairs") Runs the same txt2img job (guidance 7.5, fixed seed) interleaved,
   after one warm-up of each: (a) direct, the pipeline called in-process on the engine's
   own thread with the server idle (with a trivial step callback that only takes
   timestamps); (b) through the server, with a real WebSocket client asking for progress
   every step (and with ``--preview`` a latent preview every step too).
4. Reports, median over the pairs: denoising steps/s measured between the first and the
   second-to-last step (progress messages as the client receives them / callback
   timestamps; the server sends the last step's progress after the VAE decode, which
   runs in the same engine step, so the last step is left out on both paths) and
   steps per total wall time (direct: the pipeline call; server: submit sent -> complete
   received, which includes the text encoders, the VAE decode and the image encoding),
   and the server/direct ratios. On CUDA the direct path also gives the steps/s from
   CUDA events recorded at each step end (the GPU's own clock).
5. (section "batching") For each B of ``--batches`` (default 1, 2, 4, 8, 16; on a CPU
   1, 2, 4): B WebSocket clients (separate sessions) each submit one job of the same size
   at once (guidance 7.5, so 2 UNet rows per job: B jobs are 2B rows in one step; seeds
   differ; ``--batch-steps`` steps, default 10, 8 with ``--quick``), after one unmeasured
   2-step warm-up job. Per B: the denoising steps/s of each job (its first -> its
   second-to-last progress: the last step's progress comes after the VAE decode, in the
   same engine step); the aggregate image-steps/s (the steps all jobs did between the
   first progress any of them saw and the second-to-last step of the last one, over that
   time); the end-to-end wall (first submit -> last complete) and B x steps / wall; the
   mean rows per UNet call and the mean engine step time, from the server's
   ``latentcast_unet_rows`` and ``latentcast_step_seconds`` histograms (sum/count
   change over the round); and the speedup of both aggregate figures over B=1. A job
   that ends in CUDA out of memory (the engine retries a failing UNet call in halves
   first, so only a job failing alone ends so) records "oom" for its B, and the next B
   runs.

Without a GPU it runs on the CPU at a small size (see ``--quick``) and says so: those
figures are CPU figures, useful only to prove the script works end to end.

Readable lines go to stdout; the last line is one JSON object with every figure (section
"batching": ``models.<name>.batching``, one entry per B in ``rounds``, with ``status``
"ok", "oom", "failed" or "timeout").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_server import BenchClient, JobTrace, cpu_model, load_average, median, out
from PIL import Image

from latentcast.protocol import PreviewRequest
from latentcast.server.app import Server
from latentcast.server.config import ServerConfig
from latentcast.server.engine import diffusers_arguments
from latentcast.server.jobs import GenerationRequest

HOST = "127.0.0.1"
PROMPT = "a watercolour painting of a lighthouse at dusk"  # what BenchClient sends
GUIDANCE = 7.5
SEED = 1234
BUILD_SEED = 20240601
# Bump when a config or the build below changes: the cache folder name includes it.
BUILD_VERSION = "v1"
MODELS = ("sd15", "sdxl")
LOAD_TIMEOUT = 900.0

# ----------------------------------------------------------------------------- configs
# The real configs (the diffusers / transformers config.json of runwayml SD 1.5 and
# stabilityai SDXL base 1.0), less bookkeeping keys. Token ids are set from the local
# tokenizer at build time.

SD15_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

SD15_VAE: dict[str, Any] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# CLIP ViT-L/14 text tower (SD 1.5's text_encoder, SDXL's text_encoder).
CLIP_L_TEXT: dict[str, Any] = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "quick_gelu",
    "hidden_size": 768,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "vocab_size": 49408,
}

# OpenCLIP ViT-bigG/14 text tower (SDXL's text_encoder_2, with its projection).
CLIP_BIGG_TEXT: dict[str, Any] = {
    "attention_dropout": 0.0,
    "dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 1280,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 5120,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "vocab_size": 49408,
}

SDXL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

SDXL_VAE: dict[str, Any] = {
    **SD15_VAE,
    "force_upcast": True,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}

# Euler with the SD 1.x / SDXL training schedule (SDXL base's scheduler config, less the
# keys Euler ignores); the server's default scheduler, "euler", is built from it.
SCHEDULER: dict[str, Any] = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}


@dataclass(frozen=True)
class Plan:
    """What one model is measured at."""

    name: str
    size: int
    steps: int
    pairs: int
    #: Host memory (GiB) the CPU build/load needs; checked before starting on a CPU.
    cpu_memory_gib: float
    #: Section "batching": jobs submitted at once per round, and steps per job.
    batches: tuple[int, ...] = ()
    batch_steps: int = 0


# Per device and mode: (size, steps) per model, and pairs.
GPU_PLAN = {"sd15": (512, 30), "sdxl": (1024, 30)}
GPU_QUICK_PLAN = {"sd15": (512, 20), "sdxl": (1024, 20)}
# A CPU only proves the script works: small images, few steps. SDXL on a CPU is ~14 GB of
# fp32 weights and ~4 minutes for --quick even at 128x128 (2 busy cores: ~2 min to build,
# ~7 s per step), so --quick on a CPU leaves it out unless asked for by name (--model sdxl).
CPU_PLAN = {"sd15": (256, 8), "sdxl": (256, 4)}
CPU_QUICK_PLAN = {"sd15": (128, 4), "sdxl": (128, 3)}  # 3: the rates need steps 1..2
CPU_MEMORY_GIB = {"sd15": 8.0, "sdxl": 19.0}
# Section "batching": jobs per round (B) and steps per job, GPU / CPU; (full, --quick).
GPU_BATCHES = (1, 2, 4, 8, 16)
CPU_BATCHES = (1, 2, 4)
GPU_BATCH_STEPS = (10, 8)
CPU_BATCH_STEPS = (4, 3)
#: The server's max_batch: at least this many UNet rows, and room for the largest B.
MIN_MAX_BATCH = 32
SECTIONS = ("pairs", "batching")

# ------------------------------------------------------------------------------ helpers


def mem_available_gib() -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def rate_between(points: list[tuple[float, int]]) -> float:
    """Steps/s between the first and the last (time, step) point; nan for fewer than 2."""
    if len(points) < 2:
        return float("nan")
    (t0, s0), (t1, s1) = points[0], points[-1]
    return (s1 - s0) / (t1 - t0) if t1 > t0 else float("nan")


def fmt(x: float | None, digits: int = 3) -> str:
    return "nan" if x is None or x != x else f"{x:.{digits}f}"


def rnd(value: float, digits: int = 4) -> float | None:
    """Rounded, or None for nan (the JSON line stays standard JSON)."""
    return None if value != value else round(value, digits)


def rounded(values: list[float], digits: int = 4) -> list[float | None]:
    return [rnd(v, digits) for v in values]


def model_dir(cache_dir: Path, name: str, device: torch.device) -> Path:
    dtype = "fp16" if device.type == "cuda" else "fp32"
    return cache_dir / f"{name}-full-random-{dtype}-{BUILD_VERSION}"


# ------------------------------------------------------------------------------- build


def build_pipeline(name: str, device: torch.device) -> Any:
    """The full-size pipeline ``name`` with random weights, on ``device`` (fp16 on CUDA)."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from latentcast.server.models import build_tiny_tokenizer

    def text_config(config: dict[str, Any], tokenizer: Any) -> Any:
        return CLIPTextConfig(
            **config,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    tokenizer = build_tiny_tokenizer()
    scheduler = EulerDiscreteScheduler(**SCHEDULER)
    modules: dict[str, Any] = {}
    # Initialised directly on the device (fast on a GPU), then cast.
    with torch.device(device):
        if name == "sd15":
            torch.manual_seed(BUILD_SEED)
            modules["unet"] = UNet2DConditionModel(**SD15_UNET)
            torch.manual_seed(BUILD_SEED + 1)
            modules["vae"] = AutoencoderKL(**SD15_VAE)
            torch.manual_seed(BUILD_SEED + 2)
            modules["text_encoder"] = CLIPTextModel(text_config(CLIP_L_TEXT, tokenizer))
        else:
            torch.manual_seed(BUILD_SEED + 10)
            modules["unet"] = UNet2DConditionModel(**SDXL_UNET)
            torch.manual_seed(BUILD_SEED + 11)
            modules["vae"] = AutoencoderKL(**SDXL_VAE)
            torch.manual_seed(BUILD_SEED + 12)
            modules["text_encoder"] = CLIPTextModel(text_config(CLIP_L_TEXT, tokenizer))
            torch.manual_seed(BUILD_SEED + 13)
            modules["text_encoder_2"] = CLIPTextModelWithProjection(
                text_config(CLIP_BIGG_TEXT, tokenizer)
            )
    for key, module in modules.items():
        modules[key] = (module if dtype == torch.float32 else module.to(dtype=dtype)).eval()
    if name == "sd15":
        return StableDiffusionPipeline(
            **modules,
            tokenizer=tokenizer,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    return StableDiffusionXLPipeline(
        **modules,
        tokenizer=tokenizer,
        tokenizer_2=build_tiny_tokenizer(),
        scheduler=scheduler,
        add_watermarker=False,
    )


def build_into(name: str, target: Path, device: torch.device) -> None:
    """Build ``name`` and save it to ``target`` atomically (staging folder + rename)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        started = time.perf_counter()
        pipeline = build_pipeline(name, device)
        built = time.perf_counter()
        params = sum(
            p.numel()
            for key in ("unet", "vae", "text_encoder", "text_encoder_2")
            if getattr(pipeline, key, None) is not None
            for p in getattr(pipeline, key).parameters()
        )
        # Shards bound the extra host memory that serialisation takes.
        pipeline.save_pretrained(staging, safe_serialization=True, max_shard_size="2GB")
        saved = time.perf_counter()
        del pipeline
        os.replace(staging, target)
        print(
            f"built {name} ({params / 1e9:.2f} B parameters) in {built - started:.1f} s, "
            f"saved in {saved - built:.1f} s",
            flush=True,
        )
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def ensure_model(name: str, cache_dir: Path, device: torch.device) -> tuple[Path, float, bool]:
    """The saved model's folder, building it in a child process if missing.

    Returns (folder, seconds spent, whether it was built now).
    """
    target = model_dir(cache_dir, name, device)
    if (target / "model_index.json").is_file():
        return target, 0.0, False
    started = time.perf_counter()
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--build-only",
        name,
        "--cache-dir",
        str(cache_dir),
        "--device",
        str(device),
    ]
    subprocess.run(command, check=True)
    if not (target / "model_index.json").is_file():
        raise RuntimeError(f"building {name} left no model in {target}")
    return target, time.perf_counter() - started, True


# ---------------------------------------------------------------------------- measure


@dataclass
class Run:
    wall_s: float
    loop_steps_per_s: float
    gpu_steps_per_s: float = float("nan")
    progress_messages: int = 0
    previews: int = 0


def med(runs: list[Any], key: str) -> float:
    """Median of attribute ``key`` over ``runs``."""
    return median([getattr(r, key) for r in runs])


async def bench_model(plan: Plan, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    name, size, steps, pairs = plan.name, plan.size, plan.steps, plan.pairs
    cuda = device.type == "cuda"
    sections = SECTIONS if args.section == "both" else (args.section,)
    max_batch = max([MIN_MAX_BATCH, *(2 * b for b in plan.batches)])
    out(
        f"== {name}: {size}x{size}, guidance {GUIDANCE}, "
        + ", ".join(
            f"pairs: {steps} steps x {pairs}"
            if section == "pairs"
            else f"batching: {plan.batch_steps} steps, B {','.join(map(str, plan.batches))}"
            for section in sections
        )
        + " =="
    )
    folder, build_s, built = ensure_model(name, args.cache_dir, device)
    out(f"model    {folder} ({'built now in ' + fmt(build_s, 1) + ' s' if built else 'reused'})")
    config = ServerConfig(
        host=HOST,
        port=0,
        model=str(folder),
        device=str(device),
        cache_dir=args.cache_dir,
        max_width=max(1024, size),
        max_height=max(1024, size),
        max_batch=max_batch,
        log_level="warning",
    )
    result: dict[str, Any] = {
        "model": name,
        "folder": str(folder),
        "built_now": built,
        "build_s": round(build_s, 1),
        "max_batch_rows": max_batch,
    }
    started = time.perf_counter()
    async with Server(config) as server:
        async with asyncio.timeout(LOAD_TIMEOUT):
            await server.wait_ready()
        load_s = time.perf_counter() - started
        model = server.model
        assert model is not None
        threads = await server.engine_thread.call(torch.get_num_threads)
        result.update(
            load_s=round(load_s, 1),
            dtype=str(model.dtype).removeprefix("torch."),
            family=model.family.name,
            engine_threads=threads,
        )
        out(
            f"loaded   through the server in {load_s:.1f} s: family {model.family.name}, "
            f"{model.device}, {result['dtype']}, {threads} engine torch threads, "
            f"max_batch {max_batch} rows"
        )
        if cuda:
            out(f"gpu mem  {torch.cuda.memory_allocated() / 2**30:.1f} GiB allocated after load")
        if "pairs" in sections:
            result.update(await direct_vs_server(server, plan, args, cuda))
        if "batching" in sections:
            result["batching"] = await batching(server, plan, cuda)
    return result


async def direct_vs_server(
    server: Server, plan: Plan, args: argparse.Namespace, cuda: bool
) -> dict[str, Any]:
    """Section "pairs": the same job direct and through the server, interleaved."""
    name, size, steps, pairs = plan.name, plan.size, plan.steps, plan.pairs
    model = server.model
    assert model is not None
    out(f"-- pairs: direct vs server, {steps} steps, {pairs} pairs --")
    preview = PreviewRequest(kind="latent", every=1) if args.preview else PreviewRequest()
    result: dict[str, Any] = {
        "job": {"width": size, "height": size, "steps": steps, "guidance_scale": GUIDANCE},
        "pairs": pairs,
        "preview": "latent every step" if args.preview else "none",
    }
    request = GenerationRequest(
        prompt=PROMPT,
        negative_prompt="",
        width=size,
        height=size,
        steps=steps,
        guidance_scale=GUIDANCE,
        seed=SEED,
        scheduler=model.default_scheduler,
        num_images=1,
        preview=preview,
    )

    def direct_once() -> tuple[Run, Image.Image]:
        times: list[tuple[float, int]] = []
        events: list[Any] = []

        def on_step_end(
            pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]
        ) -> dict[str, Any]:
            times.append((time.perf_counter(), index + 1))
            if cuda:
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                events.append(event)
            return {}

        began = time.perf_counter()
        pipeline: Any = model.pipeline
        pipeline.scheduler = model.make_scheduler(request.scheduler)
        output = pipeline(**diffusers_arguments(request), callback_on_step_end=on_step_end)
        wall = time.perf_counter() - began
        gpu_rate = float("nan")
        if len(events) >= 2:
            torch.cuda.synchronize()
            gpu_rate = (len(events) - 1) / (events[0].elapsed_time(events[-1]) / 1000)
        loop_rate = rate_between([p for p in times if p[1] < steps])  # as the server's
        return Run(wall, loop_rate, gpu_rate), output.images[0]

    async def direct() -> tuple[Run, Image.Image]:
        # On the engine's own thread (its torch thread count); the server is idle.
        return await server.engine_thread.call(direct_once)

    client = await BenchClient.open(server.ws_url)
    counter = 0
    job_timeout = LOAD_TIMEOUT

    async def through_server() -> tuple[Run, JobTrace]:
        nonlocal counter
        counter += 1
        job = await client.submit(
            f"{name}-{counter}",
            preview=preview,
            width=size,
            height=size,
            steps=steps,
            guidance_scale=GUIDANCE,
            seed=SEED,
        )
        await client.wait(job.ended, within=job_timeout)
        if job.terminal is None or job.terminal.type != "complete":
            raise RuntimeError(f"{name} job ended with {job.terminal!r}")
        run = Run(
            job.terminal_at - job.submitted_at,
            rate_between(denoising_points(job, steps)),
            progress_messages=len(job.progress),
            previews=job.previews,
        )
        return run, job

    direct_runs: list[Run] = []
    server_runs: list[Run] = []
    try:
        warm_direct, direct_image = await direct()
        warm_server, warm_job = await through_server()
        # Later jobs: a generous bound from the warm-up, so the run always ends.
        job_timeout = max(120.0, 5 * max(warm_direct.wall_s, warm_server.wall_s))
        out(f"warm-up  direct {warm_direct.wall_s:8.3f} s   server {warm_server.wall_s:8.3f} s")
        served = Image.open(io.BytesIO(warm_job.terminal.images[0].data)).convert("RGB")
        same = np.array_equal(np.asarray(served), np.asarray(direct_image.convert("RGB")))
        out(f"same image from both paths: {'yes' if same else 'no'}")
        for i in range(pairs):
            # ABBA order: drift (clocks, heat) falls on both paths alike.
            if i % 2 == 0:
                d, _ = await direct()
                s, _ = await through_server()
            else:
                s, _ = await through_server()
                d, _ = await direct()
            direct_runs.append(d)
            server_runs.append(s)
            gpu = f" (gpu {fmt(d.gpu_steps_per_s, 2)})" if cuda else ""
            out(
                f"pair {i + 1}/{pairs}  direct {d.wall_s:7.3f} s "
                f"{fmt(d.loop_steps_per_s, 2)} steps/s{gpu}   "
                f"server {s.wall_s:7.3f} s {fmt(s.loop_steps_per_s, 2)} steps/s   "
                f"({s.progress_messages} progress, {s.previews} previews)"
            )
    finally:
        await client.close()

    med_d_wall, med_s_wall = med(direct_runs, "wall_s"), med(server_runs, "wall_s")
    med_d_loop = med(direct_runs, "loop_steps_per_s")
    med_s_loop = med(server_runs, "loop_steps_per_s")
    med_gpu = med(direct_runs, "gpu_steps_per_s")
    wall_rate_d, wall_rate_s = steps / med_d_wall, steps / med_s_wall
    # Rounded once, so the lines below and the JSON agree.
    loop_ratio = round(med_s_loop / med_d_loop, 4)
    wall_ratio = round(med_s_wall / med_d_wall, 4)
    label = "CPU " if not cuda else ""
    out(
        f"{label}steps/s, denoising loop (step 1->{steps - 1}):  direct {fmt(med_d_loop, 2)}   "
        f"server {fmt(med_s_loop, 2)}   server/direct {fmt(loop_ratio)}"
    )
    if cuda:
        out(f"steps/s, denoising loop (CUDA events, direct): {fmt(med_gpu, 2)}")
    out(
        f"{label}steps/s, total wall ({steps} steps / wall):     direct {fmt(wall_rate_d, 2)}   "
        f"server {fmt(wall_rate_s, 2)}"
    )
    out(
        f"{label}wall: median direct {med_d_wall:.3f} s, median server {med_s_wall:.3f} s, "
        f"server/direct {fmt(wall_ratio)}"
    )
    out()
    result.update(
        same_image=same,
        warmup_direct_s=round(warm_direct.wall_s, 3),
        warmup_server_s=round(warm_server.wall_s, 3),
        direct_wall_s=rounded([r.wall_s for r in direct_runs]),
        server_wall_s=rounded([r.wall_s for r in server_runs]),
        direct_loop_steps_per_s=rounded([r.loop_steps_per_s for r in direct_runs]),
        server_loop_steps_per_s=rounded([r.loop_steps_per_s for r in server_runs]),
        direct_gpu_steps_per_s=rounded([r.gpu_steps_per_s for r in direct_runs]),
        server_progress_messages=[r.progress_messages for r in server_runs],
        server_previews=[r.previews for r in server_runs],
        median_direct_wall_s=round(med_d_wall, 4),
        median_server_wall_s=round(med_s_wall, 4),
        median_direct_loop_steps_per_s=round(med_d_loop, 4),
        median_server_loop_steps_per_s=round(med_s_loop, 4),
        median_direct_gpu_steps_per_s=None if med_gpu != med_gpu else round(med_gpu, 4),
        direct_wall_steps_per_s=round(wall_rate_d, 4),
        server_wall_steps_per_s=round(wall_rate_s, 4),
        loop_rate_ratio_server_over_direct=loop_ratio,
        wall_ratio_server_over_direct=wall_ratio,
    )
    return result


# --------------------------------------------------------------------------- batching


def histogram_totals(histogram: Any) -> tuple[float, float]:
    """(sum, count) of a prometheus_client Histogram, as /metrics shows them."""
    samples = [s for family in histogram.collect() for s in family.samples]
    total = sum(s.value for s in samples if s.name.endswith("_sum"))
    count = sum(s.value for s in samples if s.name.endswith("_count"))
    return total, count


def engine_totals(server: Server) -> tuple[float, float, float, float]:
    """latentcast_unet_rows (sum, count) and latentcast_step_seconds (sum, count)."""
    metrics = server.metrics
    return (*histogram_totals(metrics.unet_rows), *histogram_totals(metrics.step_seconds))


def mean_change(before: tuple[float, ...], after: tuple[float, ...], at: int) -> float:
    """Mean of the histogram whose (sum, count) sit at ``at``, ``at + 1`` between readings."""
    count = after[at + 1] - before[at + 1]
    return (after[at] - before[at]) / count if count > 0 else float("nan")


def denoising_points(job: JobTrace, steps: int) -> list[tuple[float, int]]:
    """A job's progress before its last step (that one arrives after the VAE decode)."""
    return [p for p in job.progress if p[1] < steps]


def is_oom(message: str) -> bool:
    return "out of memory" in message.lower()


@dataclass
class BatchRound:
    """One round of section "batching": B jobs submitted at once, one per session."""

    batch: int
    jobs: list[JobTrace]
    steps: int
    totals_before: tuple[float, ...]
    totals_after: tuple[float, ...]

    @property
    def job_steps_per_s(self) -> list[float]:
        return [rate_between(denoising_points(job, self.steps)) for job in self.jobs]

    @property
    def aggregate_steps_per_s(self) -> float:
        """Image-steps/s of all jobs between the first progress and the last one counted."""
        points = [denoising_points(job, self.steps) for job in self.jobs]
        if any(len(p) < 2 for p in points):
            return float("nan")
        begin = min(p[0][0] for p in points)
        end = max(p[-1][0] for p in points)
        done = sum(p[-1][1] - p[0][1] for p in points)
        return done / (end - begin) if end > begin else float("nan")

    @property
    def wall_s(self) -> float:
        return max(j.terminal_at for j in self.jobs) - min(j.submitted_at for j in self.jobs)

    def figures(self) -> dict[str, Any]:
        rates = self.job_steps_per_s
        before, after = self.totals_before, self.totals_after
        return {
            "batch": self.batch,
            "status": "ok",
            "rows": self.batch * ROWS_PER_JOB,
            "job_steps_per_s": rounded(rates),
            "median_job_steps_per_s": rnd(median(rates)),
            "aggregate_image_steps_per_s": rnd(self.aggregate_steps_per_s),
            "wall_s": rnd(self.wall_s),
            "wall_image_steps_per_s": rnd(self.batch * self.steps / self.wall_s),
            "unet_calls": int(after[1] - before[1]),
            "rows_per_unet_call": rnd(mean_change(before, after, 0), 3),
            "mean_engine_step_s": rnd(mean_change(before, after, 2), 5),
            "progress_messages": [len(j.progress) for j in self.jobs],
        }


#: UNet rows per job: one image, doubled by classifier-free guidance.
ROWS_PER_JOB = 2 if GUIDANCE > 1 else 1


async def batching(server: Server, plan: Plan, cuda: bool) -> dict[str, Any]:
    """Section "batching": B sessions submit one job each at once, for each B."""
    name, size, steps = plan.name, plan.size, plan.batch_steps
    label = "CPU " if not cuda else ""
    out(
        f"-- batching: B sessions submit one {size}x{size} job each at once, {steps} steps, "
        f"guidance {GUIDANCE} ({ROWS_PER_JOB} UNet rows per job: B jobs = "
        f"{ROWS_PER_JOB}B rows), seeds differ --"
    )
    params = {"width": size, "height": size, "steps": steps, "guidance_scale": GUIDANCE}
    result: dict[str, Any] = {
        "job": params,
        "rows_per_job": ROWS_PER_JOB,
        "batches": list(plan.batches),
        "measure": "job steps/s: its first -> second-to-last progress; aggregate: steps of "
        "all jobs from the first progress to the last second-to-last step; wall: first "
        "submit -> last complete",
        "rounds": [],
    }
    clients = list(
        await asyncio.gather(*(BenchClient.open(server.ws_url) for _ in range(max(plan.batches))))
    )
    counter = 0

    async def submit(client: BenchClient, within: float, **overrides: Any) -> JobTrace:
        nonlocal counter
        counter += 1
        job = await client.submit(
            f"{name}-b{counter}", **{**params, "seed": SEED + counter, **overrides}
        )
        try:
            await client.wait(job.ended, within=within)
        except TimeoutError:
            with contextlib.suppress(Exception):
                await client.cancel(job.id)
            raise
        return job

    try:
        warm = await submit(clients[0], LOAD_TIMEOUT, steps=2)
        if warm.terminal is None or warm.terminal.type != "complete":
            raise RuntimeError(f"{name} warm-up job ended with {warm.terminal!r}")
        warm_s = warm.terminal_at - warm.submitted_at
        out(f"warm-up  one 2-step job in {warm_s:.3f} s")
        for batch in plan.batches:
            # Generous: every job's steps one after another at the warm-up's pace, x3.
            within = 120.0 + 3 * warm_s * batch * max(1.0, steps / 2)
            before = engine_totals(server)
            try:
                jobs = list(await asyncio.gather(*(submit(c, within) for c in clients[:batch])))
            except TimeoutError:
                out(f"B={batch:3d}  TIMEOUT after {within:.0f} s: the larger B are left out")
                result["rounds"].append({"batch": batch, "status": "timeout"})
                break
            except torch.cuda.OutOfMemoryError as exc:
                jobs, error = [], f"{type(exc).__name__}: {exc}"
            else:
                errors = [
                    getattr(j.terminal, "message", repr(j.terminal))
                    for j in jobs
                    if j.terminal is None or j.terminal.type != "complete"
                ]
                error = errors[0] if errors else ""
            if error:
                status = "oom" if is_oom(error) else "failed"
                out(f"B={batch:3d}  {status.upper()}: {error[:200]}")
                result["rounds"].append({"batch": batch, "status": status, "message": error})
                await server.engine_thread.call(free_memory)
                continue
            figures = BatchRound(batch, jobs, steps, before, engine_totals(server)).figures()
            result["rounds"].append(figures)
            step_s = figures["mean_engine_step_s"]
            out(
                f"B={batch:3d}  rows {figures['rows']:3d}   per job "
                f"{fmt(figures['median_job_steps_per_s'], 2)} steps/s   aggregate "
                f"{fmt(figures['aggregate_image_steps_per_s'], 2)} image-steps/s   wall "
                f"{figures['wall_s']:.3f} s ({fmt(figures['wall_image_steps_per_s'], 2)} "
                f"image-steps/s)   rows/UNet call {fmt(figures['rows_per_unet_call'], 2)} "
                f"({figures['unet_calls']} calls, {fmt(step_s and step_s * 1000, 1)}"
                " ms each)"
            )
    finally:
        await asyncio.gather(*(c.close() for c in clients))

    base = next((r for r in result["rounds"] if r["batch"] == 1 and r["status"] == "ok"), {})
    for r in result["rounds"]:
        for key, figure in (
            ("aggregate_speedup", "aggregate_image_steps_per_s"),
            ("wall_speedup", "wall_image_steps_per_s"),
        ):
            if r["status"] == "ok":  # vs B=1; None without it
                top, bottom = r[figure], base.get(figure)
                r[key] = rnd(top / bottom) if top and bottom else None
    result["summary"] = " ".join(batch_summary(r) for r in result["rounds"])
    out(
        f"{label}aggregate speedup vs B=1 (aggregate image-steps/s; end-to-end wall): "
        f"{result['summary']}"
    )
    out()
    return result


def batch_summary(figures: dict[str, Any]) -> str:
    """``B=4 x3.10/x2.80``, or ``B=16 oom``."""
    if figures["status"] != "ok":
        return f"B={figures['batch']} {figures['status']}"
    speedups = (figures["aggregate_speedup"], figures["wall_speedup"])
    return f"B={figures['batch']} x{fmt(speedups[0], 2)}/x{fmt(speedups[1], 2)}"


# ------------------------------------------------------------------------------- main


def resolve(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def make_plans(args: argparse.Namespace, device: torch.device) -> list[Plan]:
    cuda = device.type == "cuda"
    if cuda:
        table = GPU_QUICK_PLAN if args.quick else GPU_PLAN
    else:
        table = CPU_QUICK_PLAN if args.quick else CPU_PLAN
    pairs = args.pairs or (1 if args.quick and not cuda else 2 if args.quick else 5)
    batches = args.batches or (GPU_BATCHES if cuda else CPU_BATCHES)
    batch_steps = args.batch_steps or (GPU_BATCH_STEPS if cuda else CPU_BATCH_STEPS)[args.quick]
    names = MODELS if args.model == "both" else (args.model,)
    if args.quick and not cuda and args.model == "both":
        names = ("sd15",)  # see CPU_PLAN
    plans = []
    for name in names:
        size, steps = table[name]
        plans.append(
            Plan(
                name=name,
                size=args.size or size,
                steps=args.steps or steps,
                pairs=pairs,
                cpu_memory_gib=CPU_MEMORY_GIB[name],
                batches=batches,
                batch_steps=batch_steps,
            )
        )
    return plans


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Steps/s of full-size SD 1.5 / SDXL (random weights), direct vs through "
        "the latentcast server (see the module docstring)."
    )
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument(
        "--section",
        choices=[*SECTIONS, "both"],
        default="both",
        help="pairs: direct vs server; batching: B concurrent jobs (default: both)",
    )
    parser.add_argument("--steps", type=int, default=None, help="denoising steps per job")
    parser.add_argument("--pairs", type=int, default=None, help="interleaved direct/server pairs")
    parser.add_argument("--size", type=int, default=None, help="image side, for every model")
    parser.add_argument(
        "--batches",
        type=batch_list,
        default=None,
        help="section batching: jobs submitted at once, comma-separated "
        f"(default {','.join(map(str, GPU_BATCHES))}; on a CPU {','.join(map(str, CPU_BATCHES))})",
    )
    parser.add_argument(
        "--batch-steps",
        type=int,
        default=None,
        help="section batching: steps per job (at least 3; default "
        f"{GPU_BATCH_STEPS[0]}, --quick {GPU_BATCH_STEPS[1]}; on a CPU "
        f"{CPU_BATCH_STEPS[0]}, --quick {CPU_BATCH_STEPS[1]})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer steps and pairs; on a CPU also 128x128 images and no SDXL unless --model sdxl",
    )
    parser.add_argument(
        "--preview", action="store_true", help="ask the server for a latent preview every step"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "latentcast-bench-gpu",
        help="where the built models are saved and reused (default %(default)s)",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if present), cuda or cpu")
    parser.add_argument("--build-only", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for option in ("steps", "pairs", "size"):
        value = getattr(args, option)
        if value is not None and value < (8 if option == "size" else 1):
            parser.error(f"--{option} is too small")
    if args.size is not None and args.size % 8:
        parser.error("--size must be a multiple of 8")
    if args.batch_steps is not None and args.batch_steps < 3:
        parser.error("--batch-steps must be at least 3 (the rates need two steps before the last)")
    return args


def batch_list(text: str) -> tuple[int, ...]:
    """``1,2,4`` -> (1, 2, 4): positive, no repeats."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {text!r}"
        ) from None
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"batches must be positive and distinct: {text!r}")
    return values


async def run(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve(args.device)
    cuda = device.type == "cuda"
    plans = make_plans(args, device)
    device_name = torch.cuda.get_device_name(device) if cuda else f"CPU: {cpu_model()}"
    summary: dict[str, Any] = {
        "quick": args.quick,
        "cpu_figures": not cuda,
        "machine": {
            "device": str(device),
            "device_name": device_name,
            "dtype": "float16" if cuda else "float32",
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "memory_available_gib": round(mem_available_gib(), 1),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": version("diffusers"),
            "transformers": version("transformers"),
            "websockets": version("websockets"),
            "load_average_before": load_average(),
        },
        "models": {},
    }
    machine = summary["machine"]
    out("latentcast GPU benchmark: full-size architectures, random weights")
    out(f"device   {device_name} ({device}, {machine['dtype']})")
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        out(f"gpu mem  {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")
    else:
        out("*** NO GPU: these are CPU figures, at small sizes; not GPU results. ***")
    out(
        f"python   {machine['python']}   torch {machine['torch']} (cuda {machine['cuda']})   "
        f"diffusers {machine['diffusers']}   transformers {machine['transformers']}   "
        f"websockets {machine['websockets']}"
    )
    out(
        f"host     {machine['cpu']}, {machine['cores']} cores, "
        f"{machine['memory_available_gib']} GiB memory available"
    )
    out(f"cache    {args.cache_dir}")
    out(
        f"mode     {'quick' if args.quick else 'full'}, models {' '.join(p.name for p in plans)}, "
        f"sections {' '.join(SECTIONS if args.section == 'both' else (args.section,))}"
    )
    if args.model == "both" and len(plans) == 1:
        reason = "--quick on a CPU leaves SDXL out (too slow there); --model sdxl runs it"
        out(f"note     {reason}")
        summary["models"]["sdxl"] = {"skipped": reason}
    out()
    for plan in plans:
        if not cuda:
            available = mem_available_gib()
            if available < plan.cpu_memory_gib:
                reason = (
                    f"needs ~{plan.cpu_memory_gib:.0f} GiB of host memory in fp32, "
                    f"{available:.1f} GiB available"
                )
                out(f"== {plan.name}: SKIPPED on this CPU: {reason} ==")
                out()
                summary["models"][plan.name] = {"skipped": reason}
                continue
        async with asyncio.timeout(3600):
            summary["models"][plan.name] = await bench_model(plan, args, device)
        free_memory()
    machine["load_average_after"] = load_average()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.build_only:
        device = resolve(args.device)
        build_into(args.build_only, model_dir(args.cache_dir, args.build_only, device), device)
        return 0
    started = time.perf_counter()
    summary = asyncio.run(run(args))
    summary["total_s"] = round(time.perf_counter() - started, 1)
    cpu = " (CPU figures, not GPU)" if summary["cpu_figures"] else ""
    out(f"total {summary['total_s']} s{cpu}")
    for name, figures in summary["models"].items():
        if "skipped" in figures:
            out(f"{name:5s} skipped: {figures['skipped']}")
            continue
        if "job" in figures:
            job = figures["job"]
            out(
                f"{name:5s} {job['width']}x{job['height']} {job['steps']} steps{cpu}: "
                f"loop steps/s direct {fmt(figures['median_direct_loop_steps_per_s'], 2)} "
                f"server {fmt(figures['median_server_loop_steps_per_s'], 2)} "
                f"(ratio {fmt(figures['loop_rate_ratio_server_over_direct'])}); "
                f"wall ratio {fmt(figures['wall_ratio_server_over_direct'])}"
            )
        if "batching" in figures:
            batch = figures["batching"]
            job = batch["job"]
            out(
                f"{name:5s} batching {job['width']}x{job['height']} {job['steps']} steps, "
                f"{batch['rows_per_job']} rows per job{cpu}: speedup vs B=1 (aggregate/wall) "
                f"{batch['summary']}"
            )
    out(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
