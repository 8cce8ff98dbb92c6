import json
import struct

import pytest
import torch
from safetensors.torch import load_file

from clipship.errors import CheckpointError
from clipship.safetensors_io import INDEX_NAME, Checkpoint, ShardedWriter, parse_size, read_header

NAMES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(37, 11, generator=g),
        "b.half": torch.randn(5, 3, generator=g).half(),
        "c.bf16": torch.randn(8, generator=g).bfloat16(),
        "d.ids": torch.arange(7),
        "e.scalar": torch.tensor(2.5),
        "f.empty": torch.zeros(0, 4),
    }


def write(folder, tensors, max_shard_bytes=1 << 30):
    layout = {
        n: ({v: k for k, v in NAMES.items()}[t.dtype], tuple(t.shape)) for n, t in tensors.items()
    }
    writer = ShardedWriter(folder, layout, max_shard_bytes)
    for name in reversed(list(tensors)):  # any order
        writer.write(name, tensors[name])
    return writer.close()


def test_written_file_loads_with_safetensors_and_reads_back(tmp_path):
    tensors = sample_tensors()
    assert write(tmp_path, tensors) == ["model.safetensors"]
    loaded = load_file(str(tmp_path / "model.safetensors"))
    ckpt = Checkpoint.open(tmp_path)
    for name, value in tensors.items():
        assert torch.equal(loaded[name], value) and loaded[name].dtype == value.dtype
        assert torch.equal(ckpt.read(name), value)
    assert torch.equal(ckpt.read("a.weight", 5, 20), tensors["a.weight"].reshape(-1)[5:25])
    ckpt.close()


def test_pieces_can_be_written_out_of_order(tmp_path):
    value = torch.randn(10, 10)
    writer = ShardedWriter(tmp_path, {"x": ("F32", (10, 10))})
    writer.write("x", value.reshape(-1)[60:], start=60)
    with pytest.raises(RuntimeError, match="not completely written"):
        writer.close()
    writer.write("x", value.reshape(-1)[:60], start=0)
    writer.close()
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["x"], value)


def test_sharding_writes_a_standard_index(tmp_path):
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(5)}
    files = write(tmp_path, tensors, max_shard_bytes=2048)
    assert files[-1] == INDEX_NAME and len(files) == 4
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    assert set(index["weight_map"]) == set(tensors)
    ckpt = Checkpoint.open(tmp_path)
    assert all(torch.equal(ckpt.read(n), t) for n, t in tensors.items())


def test_writer_is_deterministic(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write(tmp_path / name, sample_tensors())
    assert (tmp_path / "a/model.safetensors").read_bytes() == (
        tmp_path / "b/model.safetensors"
    ).read_bytes()


def test_truncated_and_corrupt_files_are_refused(tmp_path):
    write(tmp_path, sample_tensors())
    data = (tmp_path / "model.safetensors").read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        read_header(cut)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 20) + b"{not json at all....")
    with pytest.raises(CheckpointError, match="not JSON"):
        read_header(bad)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        read_header(huge)
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        read_header(tmp_path / "tiny.safetensors")


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1000") == 1000
    with pytest.raises(CheckpointError, match="`max_shard_size` 'lots': not a size"):
        parse_size("lots")
