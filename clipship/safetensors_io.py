"""Reading and writing safetensors files one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the raw bytes. ``Checkpoint`` reads a tensor's byte range
straight into a fresh buffer with ``pread`` (no memory map, so nothing stays resident after the
tensor is dropped), and ``ShardedWriter`` writes the header first and then each tensor at its
planned offset, so a merged model never has to be held in memory. Files written here load with
the ``safetensors`` library and ``transformers``.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from clipship.errors import CheckpointError
from clipship.schemas import loads_json, name_problem, read_json

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype name, shape and absolute byte range."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def dtype_torch(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def is_float(self) -> bool:
        return DTYPES[self.dtype].is_floating_point


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check one safetensors file's header; returns ``(tensors, metadata)``.

    Raises ``CheckpointError`` naming the file for anything malformed or truncated.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{path}: corrupt or truncated safetensors header")
        try:
            header = loads_json(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError):  # not JSON, a tensor named twice, or NaN
            raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = (
                entry["dtype"],
                tuple(entry["shape"]),
                entry["data_offsets"],
            )
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
        info = TensorInfo(path, dtype, shape, base + begin, base + end)
        if end - begin != info.numel * DTYPES[dtype].itemsize or begin < 0:
            raise CheckpointError(f"{path}: corrupt header, tensor {name!r} has a wrong byte range")
        if info.end > size:
            raise CheckpointError(
                f"{path}: file is truncated (tensor {name!r} ends at byte {info.end}, "
                f"the file has {size})"
            )
        tensors[name] = info
    return tensors, metadata


class Checkpoint:
    """Lazy, read-only view of the safetensors weights in a folder (one file or sharded).

    >>> ckpt = Checkpoint.open("openai-clip/")            # doctest: +SKIP
    >>> ckpt.read("vision_model.post_layernorm.weight")    # doctest: +SKIP
    """

    def __init__(self, tensors: dict[str, TensorInfo]):
        self.tensors = tensors
        self._fds: dict[Path, int] = {}

    @classmethod
    def open(cls, folder: Path) -> Checkpoint:
        folder = Path(folder)
        index = folder / INDEX_NAME
        if (folder / WEIGHTS_NAME).is_file():
            files = [folder / WEIGHTS_NAME]
        elif index.is_file():
            data = read_json(index, CheckpointError, "safetensors index")
            weight_map = data.get("weight_map") if isinstance(data, dict) else None
            shards = set(weight_map.values()) if isinstance(weight_map, dict) else {None}
            if not all(isinstance(f, str) and name_problem(f) is None for f in shards):
                raise CheckpointError(f"{index}: corrupt safetensors index (weight_map)")
            files = [folder / f for f in sorted(shards)]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard {missing[0]} is missing")
        else:
            raise CheckpointError(f"{folder}: no {WEIGHTS_NAME} or {INDEX_NAME}")
        tensors: dict[str, TensorInfo] = {}
        for file in files:
            part, _ = read_header(file)
            tensors.update(part)
        return cls(tensors)

    @property
    def files(self) -> list[Path]:
        return sorted({t.file for t in self.tensors.values()})

    def fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def read(
        self, name: str, start: int = 0, count: int | None = None, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Read one tensor into a new, writable CPU tensor (or into ``out``, same dtype).

        With ``count``, only the flat elements ``[start, start + count)`` are read (1-D result).
        """
        info = self.tensors[name]
        dtype = DTYPES[info.dtype]
        nbytes = info.nbytes if count is None else count * dtype.itemsize
        if out is None:
            out = torch.empty(nbytes // dtype.itemsize, dtype=dtype)
        elif (
            out.dtype != dtype or out.numel() * dtype.itemsize != nbytes or not out.is_contiguous()
        ):
            raise ValueError(f"{name}: output buffer does not match {info.dtype}[{nbytes} bytes]")
        if nbytes:
            fd = self.fd(info.file)
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            offset = info.start + start * dtype.itemsize
            done = 0
            while done < nbytes:
                got = os.preadv(fd, [view[done:]], offset + done)
                if got <= 0:
                    raise CheckpointError(f"{info.file}: file is truncated (reading {name!r})")
                done += got
        return out.reshape(info.shape) if count is None else out.reshape(-1)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def parse_size(text: str | int) -> int:
    """``"5GB"`` → 5_000_000_000; ``"512MiB"`` → 536_870_912; plain integers are bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not m:
        raise CheckpointError(
            f"`max_shard_size` {text!r}: not a size (try 5GB or 500MB)", option="max_shard_size"
        )
    unit = m.group(2).rstrip("B") or ""
    base = 1024 if unit.endswith("I") else 1000
    power = " KMGT".index(unit[:1] or " ")
    return int(float(m.group(1)) * base**power)


class ShardedWriter:
    """Write a planned set of tensors to ``folder`` without holding them together in memory.

    The layout (names, dtypes, shapes) is fixed up front, so headers are written first and each
    tensor goes straight to its offset when ``write`` is called, in any order. Above
    ``max_shard_bytes`` the tensors are split over ``model-0000i-of-0000n.safetensors`` files
    with the standard ``model.safetensors.index.json``.
    """

    def __init__(
        self,
        folder: Path,
        layout: dict[str, tuple[str, tuple[int, ...]]],
        max_shard_bytes: int = 5_000_000_000,
        metadata: dict[str, str] | None = None,
    ):
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        names = sorted(layout)
        sizes = {n: math.prod(layout[n][1]) * DTYPES[layout[n][0]].itemsize for n in names}
        shards: list[list[str]] = [[]]
        used = 0
        for name in names:
            if shards[-1] and used + sizes[name] > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append(name)
            used += sizes[name]
        self.total_size = sum(sizes.values())
        if len(shards) == 1:
            filenames = [WEIGHTS_NAME]
        else:
            filenames = [
                f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, 1 + len(shards))
            ]
        self._where: dict[str, tuple[int, int, int]] = {}  # name -> (fd, offset, nbytes)
        self._sizes = sizes
        self._written: dict[str, dict[int, int]] = {n: {} for n in names}  # start byte -> bytes
        self._fds: list[int] = []
        self.files: dict[str, list[str]] = {}
        for filename, members in zip(filenames, shards):
            header: dict[str, object] = {"__metadata__": self.metadata}
            offset = 0
            for name in members:
                dtype, shape = layout[name]
                header[name] = {
                    "dtype": dtype,
                    "shape": list(shape),
                    "data_offsets": [offset, offset + sizes[name]],
                }
                offset += sizes[name]
            blob = json.dumps(header, separators=(",", ":")).encode()
            blob += b" " * (-len(blob) % 8)
            fd = os.open(self.folder / filename, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds.append(fd)
            os.pwrite(fd, struct.pack("<Q", len(blob)) + blob, 0)
            os.ftruncate(fd, 8 + len(blob) + offset)
            base = 8 + len(blob)
            for name in members:
                start = header[name]["data_offsets"][0]  # type: ignore[index]
                self._where[name] = (fd, base + start, sizes[name])
            self.files[filename] = members
        self._layout = {n: (d, tuple(s)) for n, (d, s) in layout.items()}

    def write(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write a whole tensor, or a 1-D piece of its flat elements beginning at ``start``."""
        dtype, shape = self._layout[name]
        fd, offset, nbytes = self._where[name]
        itemsize = DTYPES[dtype].itemsize
        whole = start == 0 and tuple(tensor.shape) == tuple(shape)
        piece = tensor.dim() == 1 and (start + tensor.numel()) * itemsize <= nbytes
        if DTYPE_NAMES.get(tensor.dtype) != dtype or not (whole or piece):
            raise ValueError(
                f"{name}: expected {dtype}{list(shape)}, got {tensor.dtype}{list(tensor.shape)}"
            )
        data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        offset += start * itemsize
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        self._written[name][start * itemsize] = len(data)

    def copy(self, name: str, source: TensorInfo, source_fd: int) -> None:
        """Copy a tensor's bytes from another safetensors file, in the kernel where possible."""
        fd, offset, nbytes = self._where[name]
        if (source.dtype, source.shape) != tuple(self._layout[name]) or source.nbytes != nbytes:
            raise ValueError(f"{name}: source tensor differs from the planned layout")
        done = 0
        try:
            while done < nbytes:
                got = os.copy_file_range(
                    source_fd, fd, nbytes - done, source.start + done, offset + done
                )
                if got <= 0:
                    raise OSError("short copy")
                done += got
        except OSError:  # a filesystem without copy_file_range: plain reads and writes
            while done < nbytes:
                chunk = os.pread(source_fd, min(1 << 24, nbytes - done), source.start + done)
                if not chunk:
                    raise CheckpointError(f"{source.file}: truncated (reading {name!r})") from None
                done += os.pwrite(fd, chunk, offset + done)
        self._written[name][0] = nbytes

    def close(self) -> list[str]:
        """Finish the files (and the index when sharded); returns the file names written."""
        unfinished = sorted(
            n for n, w in self._written.items() if sum(w.values()) != self._sizes[n]
        )
        if unfinished:
            raise RuntimeError(f"tensors not completely written: {unfinished[:3]}")
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": self.total_size},
                "weight_map": {n: f for f, members in self.files.items() for n in members},
            }
            (self.folder / INDEX_NAME).write_text(
                json.dumps(index, indent=2, sort_keys=True) + "\n"
            )
            return [*self.files, INDEX_NAME]
        return list(self.files)

    def abort(self) -> None:
        """Close any open file (the caller removes the folder); a no-op after ``close``."""
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
