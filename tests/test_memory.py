"""Tensors loaded from files and used in products are owned, 64-byte aligned memory.

MKL's float32 GEMM rounds differently at different alignments, so a head used in place where
``load_file`` mapped it (8 mod 64 in a heads file) gave other logits than a freshly computed one,
on some CPUs and thread counts only. These checks look at the memory itself, so they fail on the
old code on every CPU.
"""

import sys
from pathlib import Path

import pytest
import torch

from clipship.eval import build_heads, get_tasks
from clipship.eval.finetune import _restore_optimizer, _save_checkpoint
from clipship.memory import ALIGNMENT, own_module
from clipship.runtime.heads import load_clip, load_heads, save_heads
from clipship.runtime.model import load_zero_shot

from .test_eval import MNIST, PRETRAINED

pytestmark = pytest.mark.numerics  # run again under other threads/ISA (Makefile)


def mapped_files() -> list[tuple[int, int, str]]:
    """(start, end, path) of every file-backed mapping of this process (Linux)."""
    out = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            out.append((start, end, fields[5]))
    return out


def assert_owned(tensors: dict[str, torch.Tensor]) -> None:
    maps = mapped_files() if sys.platform == "linux" else []
    assert tensors
    for name, tensor in tensors.items():
        address = tensor.data_ptr()
        assert address % ALIGNMENT == 0, f"{name} is at {address % ALIGNMENT} mod {ALIGNMENT}"
        inside = [path for start, end, path in maps if start <= address < end]
        assert not inside, f"{name} lives in a mapping of {inside[0]}"


def test_heads_from_the_cache_and_from_a_heads_folder_are_owned(tmp_path):
    tasks = get_tasks("mnist,svhn")
    fresh, meta = build_heads(PRETRAINED, tasks)
    cached, _ = build_heads(PRETRAINED, tasks)  # second call: read from $CLIPSHIP_CACHE
    assert_owned(cached)
    save_heads(tmp_path / "heads", fresh, meta, force=False)
    loaded, _ = load_heads(tmp_path / "heads")
    assert_owned(loaded)
    for name in fresh:
        assert torch.equal(cached[name], fresh[name]) and torch.equal(loaded[name], fresh[name])


def test_models_are_owned_after_loading():
    zero_shot, _, _ = load_zero_shot(str(MNIST), str(PRETRAINED), "cpu")
    assert_owned(dict(zero_shot.named_parameters()) | dict(zero_shot.named_buffers()))
    model, _ = load_clip(PRETRAINED, "cpu")
    assert_owned(dict(model.named_parameters()))


def test_a_restored_optimizer_state_is_owned(tmp_path):
    from transformers import CLIPVisionModel

    vision = CLIPVisionModel.from_pretrained(MNIST)
    own_module(vision)
    optimizer = torch.optim.Adam(vision.parameters(), lr=1e-3)
    vision(pixel_values=torch.zeros(1, 3, 32, 32))[1].sum().backward()
    optimizer.step()
    _save_checkpoint(tmp_path / "step-1", vision, optimizer, 1)
    again = torch.optim.Adam(vision.parameters(), lr=1e-3)
    assert _restore_optimizer(again, tmp_path / "step-1", "cpu") == 1
    slots = {
        f"{index}.{key}": value
        for index, state in again.state_dict()["state"].items()
        for key, value in state.items()
        if key != "step"
    }
    assert_owned(slots)
    before = optimizer.state_dict()["state"]
    for name, value in slots.items():
        index, key = name.split(".")
        assert torch.equal(value, before[int(index)][key])


def test_own_module_keeps_shared_tensors_shared():
    linear = torch.nn.Linear(4, 4)
    model = torch.nn.Sequential(linear, torch.nn.ReLU(), linear)
    model.register_buffer("a", torch.arange(3.0)[1:])  # a view at an offset
    model[1].register_buffer("b", model.a)
    own_module(model)
    assert model[0].weight is model[2].weight
    assert model.a is model[1].b and model.a.data_ptr() % ALIGNMENT == 0


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/maps")
def test_the_check_sees_a_mapped_tensor(tmp_path):
    """The helper itself: a tensor used in place from ``load_file`` is caught."""
    from safetensors.torch import load_file, save_file

    save_file({"a": torch.ones(3), "head": torch.ones(4, 4)}, str(tmp_path / "x.safetensors"))
    with pytest.raises(AssertionError):
        assert_owned(load_file(str(tmp_path / "x.safetensors")))
