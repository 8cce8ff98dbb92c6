# clipship on CPU: `docker build -t clipship .` then `docker run --rm clipship --help`.
# For GPUs, build FROM an NVIDIA CUDA runtime image and set TORCH_INDEX to a CUDA wheel index;
# replace onnxruntime with onnxruntime-gpu.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_DISABLE_TELEMETRY=1

RUN useradd --create-home --uid 1000 clipship
WORKDIR /opt/clipship

# torch first, from the index that matches the hardware, so the project's range is already met.
RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY clipship ./clipship
COPY merge ./merge
COPY eval ./eval
COPY exporter ./exporter
COPY cards ./cards
RUN pip install ".[minibench]"

USER clipship
WORKDIR /home/clipship
ENTRYPOINT ["clipship"]
CMD ["--help"]
