# syntax=docker/dockerfile:1
# AMUSD server image. CPU by default; CUDA with a build argument:
#   docker build -t amusd-server:cpu .
#   docker build -t amusd-server:cuda --build-arg VARIANT=cuda .
#   docker run -p 8000:8000 -v amusd-models:/models amusd-server:cpu
# Installs with the same ./setup.sh as the README (into the virtual env /opt/venv).
# AMUSD_TORCH_SPEC overrides the torch requirement (default: CPU "torch==2.13.0",
# CUDA plain "torch", whose Linux wheels bundle the CUDA libraries).
ARG VARIANT=cpu
ARG CPU_BASE_IMAGE=python:3.11-slim
ARG CUDA_BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

FROM ${CPU_BASE_IMAGE} AS base-cpu
# gcc: the 4-bit kernel's builds (engine/kernels/q4_matmul.c; AVX2 and VNNI) are compiled at build time below
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*
ENV AMUSD_DEFAULT_TORCH_SPEC="torch==2.13.0"

FROM ${CUDA_BASE_IMAGE} AS base-cuda
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
ENV AMUSD_DEFAULT_TORCH_SPEC="torch" \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

FROM base-${VARIANT} AS final
ARG AMUSD_TORCH_SPEC=""
# "ray" for an image that runs `amusd serve-ray` / a KubeRay RayService (docker/kuberay)
ARG AMUSD_EXTRAS=""
ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AMUSD_VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    AMUSD_CACHE_DIR=/models \
    AMUSD_KERNEL_CACHE=/opt/amusd-kernels \
    HF_HOME=/models/huggingface

# uid 10001: Ubuntu 24.04 images already have uid 1000 (user "ubuntu").
RUN groupadd --gid 10001 amusd \
 && useradd --uid 10001 --gid amusd --create-home --shell /usr/sbin/nologin amusd \
 && mkdir -p /models /app \
 && chown amusd:amusd /models

WORKDIR /app
COPY . /app
RUN --mount=type=cache,target=/root/.cache/pip \
    AMUSD_TORCH_SPEC="${AMUSD_TORCH_SPEC:-$AMUSD_DEFAULT_TORCH_SPEC}" AMUSD_EXTRAS="${AMUSD_EXTRAS}" ./setup.sh \
 && amusd --help \
 && python -c "from engine import quant_q4; print('4-bit kernel builds:', quant_q4.prebuild())"

# Numeric, so that runtimes enforcing runAsNonRoot can verify it (uid 10001 = amusd).
USER 10001:10001
VOLUME /models
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://localhost:8000/health', timeout=4)"]
CMD ["amusd", "serve", "--config", "configs/default.yaml", "--host", "0.0.0.0"]
