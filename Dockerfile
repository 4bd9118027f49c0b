# latentcast server image. docs/deploy.md explains how to run it; in short:
#
#   GPU (default):  docker build -t latentcast .
#                   docker run --gpus all -p 8765:8765 --stop-timeout 45 \
#                       -v latentcast-cache:/cache latentcast
#   CPU:            docker build -t latentcast:cpu \
#                       --build-arg BASE_IMAGE=ubuntu:24.04 --build-arg TORCH_INDEX=cpu .
#
# Two build arguments choose the flavour and must agree with each other:
#   BASE_IMAGE   an Ubuntu 24.04 image: the CUDA runtime image (default) or plain ubuntu:24.04
#   TORCH_INDEX  the PyTorch wheel index torch comes from: cu130 (default, CUDA 13.0) or cpu.
#                torch is installed from that index explicitly, before anything that needs it,
#                so a CPU image never pulls the multi-GB CUDA build and a GPU image never
#                ends up with a CPU-only torch.
# TORCH_VERSION is the version the Makefile installs; keep the two in step.
#
# The image has Ray (latentcast[ray] with ray[default]), so one image plays every role of
# engines on Ray (docs/deploy.md, "Several GPUs and machines"):
#   front end:  the entry point, with --ray-address ray://HEAD:10001 --engines N
#   Ray node:   docker run --entrypoint ray ... start --head --port=6379 --block
#               docker run --entrypoint ray ... start --address=HEAD:6379 --block
#               (KubeRay replaces the entry point itself: deploy/kuberay/)

ARG BASE_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# --------------------------------------------------------------------------- build
FROM ${BASE_IMAGE} AS build

ARG TORCH_INDEX=cu130
ARG TORCH_VERSION=2.13.0

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Only Python: every dependency is a binary wheel, so no compiler is needed. Ubuntu's
# packages are not pinned to exact versions (DL3008): those change with every security
# update of the release, and the base image tag already fixes the release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the index that matches the base image (see TORCH_INDEX above).
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}"

# Then latentcast and the rest of its dependencies from PyPI; the torch installed above
# satisfies latentcast's own torch requirement and is kept (the constraint makes sure).
# The ray extra runs engines in Ray actors. ray[default] adds what the minimal ray lacks
# for a cluster: grpcio for Ray Client (ray:// addresses; `ray start --head` only listens
# on 10001 with it) and the dashboard and its agent (the health endpoints KubeRay probes).
# pip picks one ray for both, within the extra's range.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY server ./server
COPY clients/python ./clients/python
RUN echo "torch==${TORCH_VERSION}" > /tmp/constraints.txt \
    && pip install --constraint /tmp/constraints.txt "/src[ray]" "ray[default]" \
    && latentcast --version \
    && ray --version

# --------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime

# The same Python the virtual environment was built with (its interpreter is a link);
# ca-certificates for model downloads from a hub. Not pinned, as above.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# A fixed non-root user, so that volume permissions can be set up from outside
# (e.g. Kubernetes fsGroup: 10001).
RUN groupadd --system --gid 10001 latentcast \
    && useradd --system --uid 10001 --gid latentcast --create-home \
        --home-dir /home/latentcast --shell /usr/sbin/nologin latentcast \
    && mkdir -p /cache /models \
    && chown latentcast:latentcast /cache /models

COPY --from=build /opt/venv /opt/venv

# Defaults through the environment (latentcast serve reads LATENTCAST_<OPTION>; an option on
# the command line wins). Change the port through LATENTCAST_PORT, not --port, so that the
# HEALTHCHECK below follows it.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/latentcast \
    HF_HOME=/cache/huggingface \
    LATENTCAST_HOST=0.0.0.0 \
    LATENTCAST_PORT=8765 \
    LATENTCAST_MODEL=tiny \
    LATENTCAST_CACHE_DIR=/cache \
    LATENTCAST_DRAIN_TIMEOUT=30

# Ray reports anonymous usage statistics by default from clusters that `ray start` starts;
# this image turns that off (RAY_USAGE_STATS_ENABLED=1 turns it back on).
ENV RAY_USAGE_STATS_ENABLED=0

# /cache: the built-in tiny model (LATENTCAST_CACHE_DIR) and the Hugging Face cache (HF_HOME).
# /models: mount your own models here and serve one with --model /models/NAME.
VOLUME ["/cache", "/models"]

USER 10001:10001
WORKDIR /home/latentcast

EXPOSE 8765

# Healthy once the model is loaded (GET /ready answers 200); unhealthy again while draining.
# Loading a real model can take minutes: failures during --start-period do not count.
# A container run as a Ray node serves no /ready: run it with --no-healthcheck.
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request\nport = os.environ.get('LATENTCAST_PORT', '8765')\ntry:\n    urllib.request.urlopen(f'http://127.0.0.1:{port}/ready', timeout=4)\nexcept Exception as exc:\n    sys.exit(f'not ready: {exc}')"]

# SIGTERM goes straight to the server (exec form, no shell in between) and starts the
# drain: jobs may run on for --drain-timeout (LATENTCAST_DRAIN_TIMEOUT) seconds, then
# connections get up to 5 s to read before the close. Give the container longer than
# that (plus the step in flight) to stop: docker run/stop --stop-timeout 45 (Docker's
# default is 10 s), Compose stop_grace_period: 45s, Kubernetes
# terminationGracePeriodSeconds: 45.
STOPSIGNAL SIGTERM
ENTRYPOINT ["latentcast", "serve"]
CMD ["--host", "0.0.0.0"]
