# clipship: `docker build -t clipship .` (CPU) or `docker build --build-arg VARIANT=cuda -t
# clipship:cuda .` (CUDA base, CUDA torch, onnxruntime-gpu); then `docker run --rm clipship --help`.
# The install is scripts/install.sh, the same script `make` runs.
ARG VARIANT=cpu

FROM python:3.11-slim AS base-cpu
ENV VARIANT=cpu \
    PYTHON=python3

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS base-cuda
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV VARIANT=cuda \
    TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" \
    PYTHON=python3

# hadolint ignore=DL3006
FROM base-${VARIANT}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_DISABLE_TELEMETRY=1 \
    VENV=/opt/venv \
    EXTRAS=minibench \
    EDITABLE=0 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src
COPY pyproject.toml README.md ./
COPY scripts ./scripts
COPY clipship ./clipship
COPY merge ./merge
COPY eval ./eval
COPY exporter ./exporter
COPY cards ./cards
# Caches (the mini-benchmark, text heads, Hub downloads) live in /cache, whose folders any user
# may create files in (sticky, like /tmp), so `docker run --user "$(id -u):$(id -g)"` can write
# both them and a bind-mounted working folder; mount a named volume there to keep them between
# runs. What a run writes inside them belongs to its uid: keep one --user per volume.
RUN sh scripts/install.sh && useradd --create-home --uid 10001 clipship \
    && mkdir -m 1777 /cache /cache/clipship /cache/huggingface /cache/matplotlib /work
ENV CLIPSHIP_CACHE=/cache/clipship \
    HF_HOME=/cache/huggingface \
    MPLCONFIGDIR=/cache/matplotlib
VOLUME /cache
USER 10001
WORKDIR /work
ENTRYPOINT ["clipship"]
CMD ["--help"]
