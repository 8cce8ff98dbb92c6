#!/bin/sh
# The one install procedure, used by the Makefile and the Dockerfile. Environment:
#   VENV        where the virtual environment goes (default .venv)
#   PYTHON      the interpreter that creates it (default python3)
#   TORCH_SPEC  torch, installed first so the project's torch range is already met. The default
#               torch==2.13.0 resolves to a CPU build where pip's index serves one (as on our
#               development machines); elsewhere PyPI serves the CUDA build, so pass
#               "torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu" for CPU-only
#   EXTRAS      the project's extras (default dev)
#   EDITABLE    1 for an editable install (development; the default), 0 for a regular one
#   ORT_GPU     e.g. onnxruntime-gpu==1.31.1: replaces the CPU onnxruntime (CUDA machines)
set -eu
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}
EDITABLE=${EDITABLE:-1}
ORT_GPU=${ORT_GPU:-}
here=$(cd "$(dirname "$0")/.." && pwd)

"$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip --quiet --disable-pip-version-check"
$pip install --upgrade pip
# shellcheck disable=SC2086  # TORCH_SPEC may carry options such as --index-url
$pip install $TORCH_SPEC
if [ "$EDITABLE" = 1 ]; then
    $pip install -e "$here[$EXTRAS]"
else
    $pip install "$here[$EXTRAS]"
fi
if [ -n "$ORT_GPU" ]; then
    $pip uninstall -y onnxruntime
    $pip install "$ORT_GPU"
fi
