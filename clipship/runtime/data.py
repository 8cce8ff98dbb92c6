"""Test images: where they come from, and how they become pixel values.

Sources: a hub dataset through ``datasets.load_dataset`` (the normal path), or a local copy in
the formats users have — a ``save_to_disk`` folder, parquet files with image/label columns (what
hub datasets are), or an ImageFolder tree (``class_x/img.png``).

Preprocessing reproduces the pretrained ``CLIPImageProcessor`` (PIL backend) bit for bit: RGB,
PIL bicubic resize of the uint8 image (shortest edge), center crop, then rescale and normalise.
DataLoader workers do the decode/resize/crop to uint8; rescale + normalise is a per-channel
lookup table applied to whole batches on the device, with the processor's exact float32 values.

Images are opened here, never decoded by ``datasets``: an image column is read as its stored
bytes or path (``Image(decode=False)``), so each image's size is checked against
``clipship.imaging``'s limits from its header before it is decoded or resized.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from clipship.errors import DataError
from clipship.imaging import (
    ImagePreprocess,
    as_rgb,
    check_image_size,
    open_lazily,
    pillow_limits,
)
from clipship.runtime.state import hub_offline, hub_reachable, hub_state, quiet_datasets
from clipship.runtime.tasks import Task

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class Preprocess(ImagePreprocess):
    """The processor's image side, with the torch half: normalisation as a table lookup on the
    device for whole uint8 batches."""

    def lookup_table(self) -> torch.Tensor:
        return torch.from_numpy(self.table())

    def normalize(self, batch: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] → float32 pixel values, on whatever device ``batch`` is."""
        index = batch.long() + torch.arange(3, device=batch.device).view(1, 3, 1, 1) * 256
        return table.reshape(-1)[index]


class ImageSource:
    """Random access to (image, label) pairs of one task's test split."""

    def __init__(self, task: Task, split: str = "test"):
        self.task, self.split = task, split
        self.where = task.data or (task.dataset or {}).get("path") or task.name
        self._rows: Any = None
        self._files: list[tuple[Path, int]] | None = None
        # whether the data names its splits (a hub dataset, a DatasetDict, parquet files named
        # after the split); else every split reads the same images
        self.named_split = task.data is None
        self.image_column, self.label_column = "image", "label"
        if task.dataset:
            self.image_column = task.dataset.get("image_column", "image")
            self.label_column = task.dataset.get("label_column", "label")
        self._open()

    def _open(self) -> None:
        task = self.task
        if task.data is not None:
            path = Path(task.data)
            if not path.exists():
                raise DataError(f"task {task.name}: no data at {path}")
            if path.is_dir() and (
                (path / "state.json").exists() or (path / "dataset_dict.json").exists()
            ):
                with quiet_datasets() as datasets:
                    rows = _readable(task, path, lambda: datasets.load_from_disk(str(path)))
                if hasattr(rows, "keys"):
                    if self.split not in rows:
                        raise DataError(f"task {task.name}: {path} has no {self.split!r} split")
                    rows = rows[self.split]
                    self.named_split = True
                self._rows = rows
            elif path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet"))):
                self._rows, self.named_split = _readable(
                    task, path, lambda: _read_parquet(path, self.split)
                )
            elif path.is_dir():
                self._files = _image_folder(path, task)
                return
            else:
                raise DataError(
                    f"task {task.name}: {path} is not a dataset folder, parquet file or ImageFolder"
                )
        else:
            if not task.dataset:
                raise DataError(
                    f"task {task.name}: no dataset source; give its data with `data_dir` or `task`",
                    option="data_dir",
                )
            spec = task.dataset
            online = hub_reachable()  # else the local cache only, without half a minute of retries
            try:
                split = spec.get("split", "test") if self.split == "test" else self.split
                with quiet_datasets() as datasets, hub_offline(not online):
                    self._rows = datasets.load_dataset(spec["path"], spec.get("name"), split=split)
            except Exception as e:  # datasets raises many types for missing or unreachable data
                if not online and isinstance(e, ConnectionError):  # its "not cached" offline
                    raise DataError(
                        f"task {task.name}: {spec['path']} is not in the local cache (give a "
                        f"local copy with `data_dir`); the Hub is {hub_state()}",
                        option="data_dir",
                    ) from None
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise DataError(f"task {task.name}: cannot load {spec['path']} ({first})") from None
        columns = set(self._rows.column_names)
        if task.data is not None and not {self.image_column, self.label_column} <= columns:
            if {"image", "label"} <= columns:  # a local copy in FusionBench's loaded layout
                self.image_column, self.label_column = "image", "label"
        missing = [c for c in (self.image_column, self.label_column) if c not in columns]
        if missing:
            raise DataError(
                f"task {task.name}: {self.where} has no {missing[0]!r} column "
                f"(columns: {', '.join(sorted(columns))})"
            )
        self._rows = _undecoded(self._rows, self.image_column)

    def __len__(self) -> int:
        return len(self._files) if self._files is not None else len(self._rows)

    def labels(self) -> list[int]:
        """Every image's label, in row order (no image is opened)."""
        if self._files is not None:
            return [label for _, label in self._files]
        return [int(label) for label in self._rows[self.label_column]]

    def name(self, index: int) -> str:
        """How errors name one image: its file, or its row."""
        if self._files is not None:
            return str(self._files[index][0])
        return f"{self.where} row {index}"

    def load(self, index: int) -> tuple[Any, int]:
        """(the image, opened: its size checked from the header, not decoded yet; its label)."""
        where = self.name(index)
        if self._files is not None:
            path, label = self._files[index]
            return open_lazily(path, where), label
        row = self._rows[index]
        image, label = row[self.image_column], row[self.label_column]
        if isinstance(image, dict):
            if image.get("bytes"):
                image = open_lazily(io.BytesIO(image["bytes"]), where)
            elif not image.get("path"):
                raise DataError(f"{where}: no image (neither bytes nor a path)")
            elif "://" not in image["path"]:
                image = open_lazily(image["path"], where)
            else:  # a remote file (hf://, https://): datasets fetches it, Pillow's limit applies
                with quiet_datasets() as datasets, pillow_limits(where):
                    image = datasets.Image().decode_example(image)
        elif isinstance(image, (bytes, bytearray)):
            image = open_lazily(io.BytesIO(image), where)
        elif isinstance(image, str):
            image = open_lazily(image, where)
        return image, int(label)


def _undecoded(rows: Any, column: str) -> Any:
    """``rows`` with an image column read as stored (bytes or path), not decoded by
    ``datasets`` (which would decode before any size check); other columns are as they were."""
    from datasets import Image

    feature = rows.features.get(column)
    if isinstance(feature, Image) and feature.decode:
        return rows.cast_column(column, Image(decode=False))
    return rows


def _readable(task: Task, path: Path, read):
    """``read()``, with whatever a damaged dataset file raises (pyarrow, datasets, OS errors)
    turned into one line naming the task and the file."""
    try:
        return read()
    except DataError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DataError(f"task {task.name}: {path}: cannot read the data ({first})") from None


def _read_parquet(path: Path, split: str) -> tuple[Any, bool]:
    """One split of parquet data: the files named after it (``test-00000-of-00001.parquet``),
    or every file when none is; and whether some were."""
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    named = [f for f in files if f.name.startswith(f"{split}-") or f.parent.name == split]
    chosen = named or files
    with quiet_datasets() as datasets:
        return datasets.Dataset.from_parquet([str(f) for f in chosen]), bool(named)


def _image_folder(path: Path, task: Task) -> list[tuple[Path, int]]:
    """``class_x/img.png`` files in sorted order; classes in sorted folder order."""
    classes = sorted(p for p in path.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"task {task.name}: {path} has no class folders")
    if len(classes) != len(task.classnames):
        raise DataError(
            f"task {task.name}: {path} has {len(classes)} class folders, the task has "
            f"{len(task.classnames)} classes"
        )
    files = []
    for label, folder in enumerate(classes):
        files += [
            (f, label) for f in sorted(folder.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES
        ]
    return files


class TaskImages(torch.utils.data.Dataset):
    """What DataLoader workers produce: (uint8 [3, H, W] or an error, label, index)."""

    def __init__(
        self,
        source: ImageSource,
        preprocess: Preprocess,
        limit: int | None = None,
        corruption: Any = None,  # clipship.runtime.corruptions.Corruption: applied per image
    ):
        self.source, self.preprocess, self.corruption = source, preprocess, corruption
        self.length = len(source) if limit is None else min(limit, len(source))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        try:
            image, label = self.source.load(index)
            if self.corruption is not None:  # on the upright RGB image, once its size is checked
                where = self.source.name(index)
                check_image_size(image.size, where)
                self.preprocess.resized_size(image.size, where)
                image = self.corruption(as_rgb(image), index)
            array = self.preprocess.to_uint8(image, self.source.name(index))
            return torch.from_numpy(array), label, index
        except (
            Exception
        ) as e:  # a corrupt or oversized image: reported (or skipped) by the caller, by index
            return f"{type(e).__name__}: {e}", -1, index


def collate(
    items: list[tuple[Any, int, int]],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
    """(uint8 images, labels, their indices, [(index, error)] for images that failed)."""
    good = [(x, label, index) for x, label, index in items if isinstance(x, torch.Tensor)]
    bad = [(index, x) for x, _, index in items if not isinstance(x, torch.Tensor)]
    if not good:
        empty = torch.empty(0, dtype=torch.long)
        return torch.empty(0, dtype=torch.uint8), empty, empty, bad
    images = torch.stack([x for x, _, _ in good])
    labels = torch.tensor([label for _, label, _ in good], dtype=torch.long)
    return images, labels, torch.tensor([index for _, _, index in good]), bad
