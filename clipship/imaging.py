"""Image preprocessing that reproduces ``CLIPImageProcessor`` (PIL backend) bit for bit.

numpy and Pillow only, so deployed predictors (``clipship predict``) need no torch: RGB, PIL
bicubic resize of the uint8 image (shortest edge), center crop; then rescale and normalise, which
for uint8 input is a per-channel lookup table of the processor's exact float32 values.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipship.errors import DataError


@dataclass(frozen=True)
class ImagePreprocess:
    """The image side of a CLIP processor: resize, center crop, rescale, normalise."""

    shortest_edge: int | None
    size_hw: tuple[int, int] | None
    crop_hw: tuple[int, int] | None
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = 3  # PIL bicubic

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ImagePreprocess:
        size = config.get("size", {"shortest_edge": 224})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop = config.get("crop_size", size) if config.get("do_center_crop", True) else None
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        return cls(
            shortest_edge=size.get("shortest_edge") if config.get("do_resize", True) else None,
            size_hw=(size["height"], size["width"])
            if "height" in size and config.get("do_resize", True)
            else None,
            crop_hw=(crop["height"], crop["width"]) if crop and "height" in crop else None,
            rescale_factor=float(config.get("rescale_factor", 1 / 255))
            if config.get("do_rescale", True)
            else 1.0,
            mean=tuple(config.get("image_mean", (0.0, 0.0, 0.0)))
            if config.get("do_normalize", True)
            else (0.0, 0.0, 0.0),
            std=tuple(config.get("image_std", (1.0, 1.0, 1.0)))
            if config.get("do_normalize", True)
            else (1.0, 1.0, 1.0),
            resample=int(config.get("resample", 3)),
        )

    @classmethod
    def from_pretrained(cls, folder: Path) -> ImagePreprocess:
        folder = Path(folder)
        for name in ("preprocessor_config.json", "processor_config.json"):
            path = folder / name
            if path.is_file():
                config = json.loads(path.read_text())
                return cls.from_config(config.get("image_processor", config))
        raise DataError(f"{folder}: no preprocessor_config.json or processor_config.json")

    def record(self) -> dict[str, Any]:
        return {
            "shortest_edge": self.shortest_edge,
            "size": self.size_hw,
            "crop": self.crop_hw,
            "rescale_factor": self.rescale_factor,
            "mean": list(self.mean),
            "std": list(self.std),
            "resample": "bicubic" if self.resample == 3 else self.resample,
        }

    def to_uint8(self, image: Any) -> np.ndarray:
        """A PIL image → the resized, center-cropped uint8 array [3, H, W]."""
        image = as_rgb(image)
        if self.size_hw is not None:
            image = image.resize((self.size_hw[1], self.size_hw[0]), resample=self.resample)
        elif self.shortest_edge is not None:
            w, h = image.size
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.shortest_edge * long / short)
            new_w, new_h = (
                (self.shortest_edge, new_long) if w <= h else (new_long, self.shortest_edge)
            )
            if (new_w, new_h) != (w, h):
                image = image.resize((new_w, new_h), resample=self.resample)
        array = np.asarray(image, dtype=np.uint8)
        if self.crop_hw is not None:
            array = center_crop(array, *self.crop_hw)
        return np.ascontiguousarray(array.transpose(2, 0, 1))

    def table(self) -> np.ndarray:
        """[3, 256] float32: the processor's exact value for every channel and uint8 level."""
        levels = (np.arange(256, dtype=np.float64) * self.rescale_factor).astype(np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)[:, None]
        std = np.asarray(self.std, dtype=np.float32)[:, None]
        return (levels[None, :] - mean) / std


def as_rgb(image: Any) -> Any:
    """An 8-bit RGB image the way users' photos are meant to look: the EXIF orientation applied
    (a phone photo stands upright; ``transformers``' ``load_image`` does the same), and 16-bit
    greyscale scaled to 8 bits (``convert("RGB")``, and so ``load_image``, clips it to a few
    grey levels)."""
    from PIL import Image, ImageOps

    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF: Pillow raises several types; the pixels are still fine
        pass
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.int64)
        if image.mode != "I" or values.max(initial=0) > 255:
            values = values >> 8  # 16-bit range to 8 bits
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    return image.convert("RGB")


def open_image(path: Any) -> Any:
    """Open and decode an image file; anything unreadable (or a decompression bomb) is one
    ``DataError`` naming the file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot read the image ({type(e).__name__}: {e})") from None


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop [H, W, C] to the center (zero-padding first if the image is smaller)."""
    h, w = array.shape[:2]
    if h < height or w < width:
        padded = np.zeros((max(h, height), max(w, width), array.shape[2]), dtype=array.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top : top + h, left : left + w] = array
        array, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return array[top : top + height, left : left + width]
