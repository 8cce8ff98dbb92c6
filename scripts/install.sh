#!/bin/sh
# The one install procedure, used by the Makefile and the Dockerfile. Environment:
#   VENV        where the virtual environment goes (default .venv)
#   PYTHON      the interpreter that creates it (default python3)
#   VARIANT     cpu, cuda or auto (the default: cuda where `nvidia-smi -L` lists a GPU, else cpu)
#                 cpu   torch's CPU build from PyTorch's own index (about 190 MB; PyPI's Linux
#                       x86-64 wheel is the CUDA build, about 2.7 GB with its CUDA libraries).
#                       With VARIANT=auto, where that index cannot be reached, the configured
#                       index's torch, said in one line (a mirror may serve the CPU build under
#                       the same version); an explicit VARIANT=cpu never falls back.
#                 cuda  PyPI's torch (CUDA 13 on Linux x86-64) and onnxruntime-gpu in place of
#                       onnxruntime (ORT_GPU), for `--device cuda` and ONNX on CUDA or TensorRT
#   TORCH_SPEC  overrides the torch requirement and its options (then VARIANT only picks
#               onnxruntime), e.g. "torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
#   EXTRAS      the project's extras (default dev)
#   EDITABLE    1 for an editable install (development; the default), 0 for a regular one
#   ORT_GPU     the onnxruntime-gpu requirement of the cuda variant (default onnxruntime-gpu==1.31.1)
#   TORCH_CPU_INDEX  PyPI-style index of torch's CPU builds (default PyTorch's own)
#   DRY_RUN     1: print the variant and the pip commands, install nothing (tests/test_install.py)
set -eu
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
VARIANT=${VARIANT:-auto}
TORCH_VERSION=2.13.0
CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}
EXTRAS=${EXTRAS:-dev}
EDITABLE=${EDITABLE:-1}
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
DRY_RUN=${DRY_RUN:-0}
here=$(cd "$(dirname "$0")/.." && pwd)

ASKED=$VARIANT
if [ "$VARIANT" = auto ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
        VARIANT=cuda
    else
        VARIANT=cpu
    fi
fi
case "$VARIANT" in
    cpu | cuda) ;;
    *) echo "error: VARIANT must be cpu, cuda or auto (got $VARIANT)" >&2; exit 2 ;;
esac

reachable() {  # one short request: an unreachable index costs 5 s, not pip's retries
    "$PYTHON" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
        "$1/torch/" >/dev/null 2>&1
}

if [ -z "${TORCH_SPEC:-}" ]; then
    if [ "$VARIANT" = cuda ]; then
        TORCH_SPEC="torch==$TORCH_VERSION"
        echo "install: torch $TORCH_VERSION CUDA build from PyPI (about 2.7 GB with its CUDA libraries)"
    elif [ "$ASKED" = cpu ] || reachable "$CPU_INDEX"; then  # asked for: pip says if it fails
        TORCH_SPEC="torch==$TORCH_VERSION --index-url $CPU_INDEX"
        echo "install: torch $TORCH_VERSION CPU build from $CPU_INDEX (about 190 MB)"
    else
        TORCH_SPEC="torch==$TORCH_VERSION"
        echo "install: $CPU_INDEX is unreachable; torch $TORCH_VERSION from the configured index" \
            "(on Linux x86-64, PyPI's is the CUDA build)"
    fi
fi

run() {
    if [ "$DRY_RUN" = 1 ]; then echo "+ $*"; else "$@"; fi
}

run "$PYTHON" -m venv "$VENV"
pip="$VENV/bin/python -m pip --quiet --disable-pip-version-check"
# shellcheck disable=SC2086  # $pip and TORCH_SPEC are word lists (TORCH_SPEC may carry options)
run $pip install --upgrade pip
# shellcheck disable=SC2086
run $pip install $TORCH_SPEC
if [ "$EDITABLE" = 1 ]; then
    # shellcheck disable=SC2086
    run $pip install -e "$here[$EXTRAS]"
else
    # shellcheck disable=SC2086
    run $pip install "$here[$EXTRAS]"
fi
if [ "$VARIANT" = cuda ]; then
    # shellcheck disable=SC2086
    run $pip uninstall -y onnxruntime
    # shellcheck disable=SC2086
    run $pip install "$ORT_GPU"
fi
echo "install: done; activate with: . $VENV/bin/activate"
