"""Tensors read from files become owned, aligned memory before any arithmetic touches them.

``safetensors.torch.load_file`` and ``transformers``' ``from_pretrained`` hand out tensors that
are views of a memory-mapped file, at whatever offset the file's header length puts them. MKL's
float32 GEMM gives different bits for the same numbers at different alignments (Intel documents
that repeatable results need 64-byte aligned arrays and a fixed thread count), so the same head
read from the cache and freshly computed gave different logits, and a resumed fine-tune drifted
from an uninterrupted one. Every loader that feeds a product goes through these helpers: a clone
lives in torch's CPU allocator, which aligns to 64 bytes, and no longer depends on the file.
"""

from __future__ import annotations

from pathlib import Path

import torch

ALIGNMENT = 64


def owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of a CPU ``tensor`` in freshly allocated memory; others unchanged."""
    if tensor.device.type != "cpu":
        return tensor
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def load_owned(path: Path | str) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with every tensor copied out of the file's mapping."""
    from safetensors.torch import load_file

    return {name: owned(tensor) for name, tensor in load_file(str(path)).items()}


@torch.no_grad()
def own_module(module: torch.nn.Module) -> torch.nn.Module:
    """Copy every CPU parameter and buffer of ``module`` into owned memory, in place; parameters
    and buffers shared between submodules stay shared."""
    copies: dict[int, torch.Tensor] = {}
    for parameter in module.parameters():  # unique Parameter objects: tied weights stay tied
        parameter.data = owned(parameter.data)
    for sub in module.modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None:
                if id(buffer) not in copies:
                    copies[id(buffer)] = owned(buffer)
                sub._buffers[name] = copies[id(buffer)]
    return module
