"""What CPU a figure was measured on: model name and the instruction sets that change numerics.

Float and int8 kernels (MKL, oneDNN, onnxruntime's MLAS) pick their code by these flags, so
benchmarks print this line first and export reports record it.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

from clipship.errors import ClipshipError

# x86-64: vector width and int8 dot products; ARM: dot products and int8 matrix multiply.
FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp", "i8mm")


def cpu() -> dict[str, object]:
    """``{"model", "machine", "cpus", "flags"}`` with ``flags`` the subset of :data:`FLAGS`
    this CPU has (from /proc/cpuinfo on Linux; empty elsewhere)."""
    model, flags, family = platform.processor() or "unknown CPU", set(), {}
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    for line in info.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model in ("unknown CPU", platform.machine()):
            model = value.strip()
        elif key in ("flags", "Features"):
            flags |= set(value.split())
        elif key in ("cpu family", "model") and key not in family:
            family[key] = value.strip()
    if len(family) == 2:  # x86: a model name such as "AMD EPYC" leaves the generation open
        model += f" (family {family['cpu family']}, model {family['model']})"
    return {
        "model": model,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "flags": [f for f in FLAGS if f in flags],
    }


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Have glibc serve blocks of ``threshold`` bytes or more with mmap, so a freed tensor goes
    back to the system. Its default threshold rises to 32 MiB once large blocks are freed, after
    which every freed MLP-sized temporary (a ViT-B/32 fc1 weight is 9 MiB, made and dropped per
    layer while a mixture adapts) stays in the heap, and a merge's resident size keeps growing
    past what it uses. `clipship merge` calls this at start; no-op (False) where the C library
    is not glibc."""
    import ctypes
    import ctypes.util

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, threshold))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False


def describe() -> str:
    """One line, e.g. ``CPU: AMD EPYC (family 25, model 17) (x86_64, 2 CPUs) avx2 avx512f``."""
    c = cpu()
    return f"CPU: {c['model']} ({c['machine']}, {c['cpus']} CPUs) {' '.join(c['flags']) or '-'}"


def pick_device(device: str) -> str:
    """``auto``, ``cpu`` or ``cuda[:N]`` → the torch device to compute on (checked here)."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ClipshipError(
            "`device` cuda: no CUDA GPU is available (use `device` cpu or auto)", option="device"
        )
    if device != "cpu" and not device.startswith("cuda"):
        raise ClipshipError(f"`device` {device}: choose cuda, cpu or auto", option="device")
    return device
