"""Image preprocessing that reproduces ``CLIPImageProcessor`` (PIL backend) bit for bit, within
bounds that no image or preprocessing config can push clipship past.

numpy and Pillow only, so deployed predictors (``clipship predict``) need no torch: RGB, PIL
bicubic resize of the uint8 image (shortest edge), center crop; then rescale and normalise, which
for uint8 input is a per-channel lookup table of the processor's exact float32 values.

A file's header says how large its image is, and a few bytes can claim a huge one; the size after
a resize follows from it. So both are checked before any pixel is decoded or resized (the
``MAX_*`` limits below), and every preprocessing value read from a file is checked too
(``from_config`` for a model's processor config, ``from_record`` for ``export.json``): each refusal
is one ``DataError`` line naming the file, or the key.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clipship.errors import DataError, shown

# A decoded image: Pillow's own default ``Image.MAX_IMAGE_PIXELS`` (89.5 megapixels, 358 MB as
# Pillow holds RGB). Pillow only warns between 1× and 2× it; here anything over 1× is refused,
# and Pillow's limit is set to the same value before each open: one limit, not two.
MAX_IMAGE_PIXELS = 89_478_485
# Any side of an image, decoded or resized: JPEG's own maximum. Pillow's resampler allocates its
# filter weights in proportion to a side, whatever the area, and a resize to a shortest edge
# multiplies the long side: a 274-byte 200000×1 PNG resized to a 224 shortest edge would be
# 44.8 M × 224 pixels. At this bound the weights stay under 4 MB.
MAX_IMAGE_SIDE = 65_535
# A resized image: 16.8 megapixels, 64 MiB as Pillow holds it (a 224-pixel model still takes any
# aspect ratio up to 292:1, where the side bound binds first).
MAX_RESIZED_PIXELS = 1 << 24
# Shortest edge, size and crop in a preprocessing config: CLIP-family encoders take 224–448
# pixels and the largest vision encoders 1024; at 2048 one float32 image is 48 MiB.
MAX_PREPROCESS_SIDE = 2048
# A processor config file (a few hundred bytes in practice), read whole.
MAX_CONFIG_BYTES = 1 << 20

ORIENTATION = 0x0112  # the EXIF tag

_LIMITS = f"clipship reads images up to {MAX_IMAGE_PIXELS:,} pixels and {MAX_IMAGE_SIDE:,} a side"


@dataclass(frozen=True)
class ImagePreprocess:
    """The image side of a CLIP processor: resize, center crop, rescale, normalise.

    Build it from a file with ``from_pretrained`` / ``from_config`` (a model's processor config)
    or ``from_record`` (``export.json``), which check every value:

    >>> ImagePreprocess.from_config({"size": 224, "crop_size": 224, "image_mean": [0.5] * 3,
    ...                              "image_std": [0.5] * 3}).crop_hw
    (224, 224)
    """

    shortest_edge: int | None
    size_hw: tuple[int, int] | None
    crop_hw: tuple[int, int] | None
    rescale_factor: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = 3  # PIL bicubic

    @classmethod
    def from_config(
        cls, config: dict[str, Any], where: str = "the preprocessor config"
    ) -> ImagePreprocess:
        """A ``CLIPImageProcessor`` config (``to_dict()``, ``preprocessor_config.json``), every
        value it uses checked. Steps default to on and ``rescale_factor`` / ``resample`` to
        transformers' CLIP defaults (older configs omit them); sizes, mean and std must be
        given (their defaults differ between processors)."""
        if not isinstance(config, dict):
            raise DataError(f"{where}: not a JSON object of image processor settings")

        def flag(key: str) -> bool:
            value = config.get(key, True)
            if not isinstance(value, bool):
                raise DataError(f"{where}: {key} {shown(value)}: must be true or false")
            return value

        def given(key: str, step: str) -> Any:
            if key not in config:
                raise DataError(f"{where}: no {key} (needed with {step} on)")
            return config[key]

        shortest_edge = size_hw = crop_hw = None
        if flag("do_resize"):
            size = given("size", "do_resize")
            if isinstance(size, dict) and set(size) == {"shortest_edge"}:
                shortest_edge = _side(size["shortest_edge"], "size.shortest_edge", where)
            elif isinstance(size, dict) and set(size) == {"height", "width"}:
                size_hw = _pair([size["height"], size["width"]], "size", where)
            else:  # an int is a shortest edge (transformers' get_size_dict for CLIP)
                shortest_edge = _side(size, "size", where, "or {shortest_edge} / {height, width}")
        if flag("do_center_crop"):
            crop = given("crop_size", "do_center_crop")
            if isinstance(crop, dict) and set(crop) == {"height", "width"}:
                crop_hw = _pair([crop["height"], crop["width"]], "crop_size", where)
            else:
                side = _side(crop, "crop_size", where, "or {height, width}")
                crop_hw = (side, side)
        normalize = flag("do_normalize")
        return cls._checked(
            where,
            {"rescale_factor": "rescale_factor", "mean": "image_mean", "std": "image_std"},
            shortest_edge=shortest_edge,
            size_hw=size_hw,
            crop_hw=crop_hw,
            rescale_factor=_positive(config.get("rescale_factor", 1 / 255), "rescale_factor", where)
            if flag("do_rescale")
            else 1.0,
            mean=_channels(given("image_mean", "do_normalize"), "image_mean", where)
            if normalize
            else (0.0, 0.0, 0.0),
            std=_channels(given("image_std", "do_normalize"), "image_std", where, positive=True)
            if normalize
            else (1.0, 1.0, 1.0),
            resample=_resample(config.get("resample", 3), "resample", where),
        )

    @classmethod
    def from_record(cls, record: Any, where: str = "export.json") -> ImagePreprocess:
        """The inverse of ``record()`` (``export.json``'s ``preprocessing``), every value checked:
        all seven keys present, sides whole numbers from 1 to ``MAX_PREPROCESS_SIDE``, three
        finite means and positive stds, a positive finite rescale factor, a Pillow filter."""
        if not isinstance(record, dict):
            raise DataError(f"{where}: preprocessing {shown(record)}: must be an object")
        keys = {k: f"preprocessing.{k}" for k in PREPROCESSING_KEYS}
        missing = [k for k in PREPROCESSING_KEYS if k not in record]
        if missing:
            raise DataError(f"{where}: no {keys[missing[0]]} (re-export the model)")
        if record["shortest_edge"] is not None and record["size"] is not None:
            raise DataError(
                f"{where}: {keys['shortest_edge']} and {keys['size']} are both set: "
                "a resize has one of them"
            )

        def optional(key: str, check) -> Any:
            return None if record[key] is None else check(record[key], keys[key], where)

        return cls._checked(
            where,
            keys,
            shortest_edge=optional("shortest_edge", _side),
            size_hw=optional("size", _pair),
            crop_hw=optional("crop", _pair),
            rescale_factor=_positive(record["rescale_factor"], keys["rescale_factor"], where),
            mean=_channels(record["mean"], keys["mean"], where),
            std=_channels(record["std"], keys["std"], where, positive=True),
            resample=_resample(record["resample"], keys["resample"], where),
        )

    @classmethod
    def _checked(cls, where: str, keys: dict[str, str], **fields: Any) -> ImagePreprocess:
        """The one constructor path from a file: ``fields`` are checked one by one already;
        here, what only their combination shows (``keys``: the file's name for each field)."""
        preprocess = cls(**fields)
        # Each value can be a finite float64 and still overflow float32 (1e39, or a product).
        with np.errstate(all="ignore"):
            finite = bool(np.isfinite(preprocess.table()).all())
        if not finite:
            raise DataError(
                f"{where}: {keys['rescale_factor']}, {keys['mean']} and {keys['std']} give pixel "
                "values beyond float32"
            )
        return preprocess

    @classmethod
    def from_pretrained(cls, folder: Path) -> ImagePreprocess:
        folder = Path(folder)
        for name in ("preprocessor_config.json", "processor_config.json"):
            path = folder / name
            if path.is_file():
                if path.stat().st_size > MAX_CONFIG_BYTES:
                    raise DataError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB")
                try:
                    config = json.loads(path.read_bytes())
                except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                    raise DataError(f"{path}: not valid JSON") from None
                if isinstance(config, dict):  # processor_config.json nests it
                    config = config.get("image_processor", config)
                return cls.from_config(config, str(path))
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

    def resized_size(self, size: tuple[int, int], where: str = "image") -> tuple[int, int]:
        """(width, height) of a ``size`` image after the resize (its own size without one);
        one ``DataError`` if that is beyond ``MAX_RESIZED_PIXELS`` or ``MAX_IMAGE_SIDE``."""
        w, h = size
        if self.size_hw is not None:
            new = (self.size_hw[1], self.size_hw[0])
        elif self.shortest_edge is not None:
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(self.shortest_edge * long / short)
            new = (self.shortest_edge, new_long) if w <= h else (new_long, self.shortest_edge)
        else:
            return size
        if new[0] * new[1] > MAX_RESIZED_PIXELS or max(new) > MAX_IMAGE_SIDE:
            raise DataError(
                f"{where}: cannot preprocess the {w}×{h} image: resized it would be "
                f"{new[0]}×{new[1]} (clipship resizes to at most {MAX_RESIZED_PIXELS:,} pixels "
                f"and {MAX_IMAGE_SIDE:,} a side)"
            )
        return new

    def to_uint8(self, image: Any, where: str | None = None) -> np.ndarray:
        """A PIL image (opened; decoded or not) → the resized, center-cropped uint8 array
        [3, H, W]. Its size and its size after the resize are checked before anything is
        decoded or resized; ``where`` (default: the image's file) names it in the error."""
        where = str(where or getattr(image, "filename", "") or "image")
        check_image_size(image.size, where)
        # Refused now, before as_rgb decodes it: turning it upright swaps width and height,
        # which leaves both limits' verdicts unchanged.
        self.resized_size(image.size, where)
        image = as_rgb(image)
        size = self.resized_size(image.size, where)
        if size != image.size:
            image = image.resize(size, resample=self.resample)
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


PREPROCESSING_KEYS = ("shortest_edge", "size", "crop", "rescale_factor", "mean", "std", "resample")


def _side(value: Any, key: str, where: str, also: str = "") -> int:
    """A side in pixels: a whole number (not a bool, not 224.0) from 1 to the bound."""
    if isinstance(value, bool) or not isinstance(value, int):
        ok = False
    else:
        ok = 1 <= value <= MAX_PREPROCESS_SIDE
    if not ok:
        raise DataError(
            f"{where}: {key} {shown(value)}: must be a whole number of pixels from 1 to "
            f"{MAX_PREPROCESS_SIDE}" + (f" {also}" if also else "")
        )
    return value


def _pair(value: Any, key: str, where: str) -> tuple[int, int]:
    """[height, width], each a side."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise DataError(f"{where}: {key} {shown(value)}: must be [height, width]")
    try:
        return (_side(value[0], key, where), _side(value[1], key, where))
    except DataError:  # name the pair, not one of its numbers
        raise DataError(
            f"{where}: {key} {shown(value)}: height and width must be whole numbers of pixels "
            f"from 1 to {MAX_PREPROCESS_SIDE}"
        ) from None


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive(value: Any, key: str, where: str) -> float:
    if not _number(value) or value <= 0:
        raise DataError(f"{where}: {key} {shown(value)}: must be a finite number above 0")
    return float(value)


def _channels(
    value: Any, key: str, where: str, positive: bool = False
) -> tuple[float, float, float]:
    """Three finite numbers, one per RGB channel (stds above 0: they divide)."""
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(map(_number, value))
    if not ok or (positive and min(value) <= 0):
        kind = "finite numbers above 0" if positive else "finite numbers"
        raise DataError(f"{where}: {key} {shown(value)}: must be three {kind} (R, G, B)")
    return tuple(float(v) for v in value)  # type: ignore[return-value]


def _resample(value: Any, key: str, where: str) -> int:
    """One of Pillow's resampling filters, by number or by name ("bicubic")."""
    from PIL import Image

    filters = {f.name.lower(): int(f) for f in Image.Resampling}
    if isinstance(value, str) and value in filters:
        return filters[value]
    if isinstance(value, int) and not isinstance(value, bool) and value in filters.values():
        return value
    names = ", ".join(f"{name} ({number})" for name, number in filters.items())
    raise DataError(f"{where}: {key} {shown(value)}: must be one of Pillow's filters: {names}")


def check_image_size(size: tuple[int, int], where: str) -> None:
    """Refuse an image beyond ``MAX_IMAGE_PIXELS`` or ``MAX_IMAGE_SIDE`` (or an empty one),
    from its header's size, before it is decoded."""
    w, h = size
    if w < 1 or h < 1 or w * h > MAX_IMAGE_PIXELS or max(w, h) > MAX_IMAGE_SIDE:
        raise DataError(f"{where}: cannot read the image ({w}×{h} pixels; {_LIMITS})")


@contextlib.contextmanager
def pillow_limits(where: str) -> Iterator[Any]:
    """``PIL.Image`` with its decompression-bomb limit at ``MAX_IMAGE_PIXELS`` and its warning
    range refused too, for the opens inside (Pillow checks a header's size as it opens the file);
    a refusal is one ``DataError`` naming ``where``."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield Image
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        pixels = re.search(r"\((\d+) pixels\)", str(e))
        size = f"{int(pixels[1]):,} pixels" if pixels else "too many pixels"
        raise DataError(f"{where}: cannot read the image ({size}; {_LIMITS})") from None


def open_lazily(source: Any, where: str) -> Any:
    """``Image.open`` (a path or a binary file): the header is read and the size checked, the
    pixels are not decoded yet. Anything unreadable or too large is one ``DataError``."""
    with pillow_limits(where) as Image:
        try:
            image = Image.open(source)
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise DataError(f"{where}: cannot read the image ({type(e).__name__}: {e})") from None
    try:
        check_image_size(image.size, where)
    except DataError:
        image.close()
        raise
    return image


def as_rgb(image: Any) -> Any:
    """An 8-bit RGB image the way users' photos are meant to look: the EXIF orientation applied
    (a phone photo stands upright; ``transformers``' ``load_image`` does the same), and 16-bit
    greyscale scaled to 8 bits (``convert("RGB")``, and so ``load_image``, clips it to a few
    grey levels)."""
    from PIL import Image, ImageOps

    # No copy of the image where nothing changes (exif_transpose and convert would make one).
    try:
        if image.getexif().get(ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
    except Exception:  # malformed EXIF: Pillow raises several types; the pixels are still fine
        pass
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image)  # uint16, or int32 for "I": no wider copy than the image
        if image.mode != "I" or values.max(initial=0) > 255:
            values = values >> 8  # 16-bit range to 8 bits
        image = Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L")
    return image if image.mode == "RGB" else image.convert("RGB")


def open_image(path: Any) -> Any:
    """Open and decode an image file, its size checked from the header first; anything
    unreadable, or beyond the limits (a decompression bomb), is one ``DataError`` naming it."""
    where = str(path)
    image = open_lazily(path, where)
    with pillow_limits(where), image:
        try:
            image.load()
        except (OSError, ValueError, SyntaxError, EOFError) as e:
            raise DataError(f"{where}: cannot read the image ({type(e).__name__}: {e})") from None
        check_image_size(image.size, where)  # a format may settle its size only as it loads
        return image.copy()


def center_crop(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Crop [H, W, C] to the center, zero-padding where the image is smaller, as transformers'
    ``center_crop`` does (the image sits ceil((crop - side) / 2) from the top or left edge);
    no padded copy of the whole image is made."""
    h, w = array.shape[:2]
    if h >= height and w >= width:
        top, left = (h - height) // 2, (w - width) // 2
        return array[top : top + height, left : left + width]
    out = np.zeros((height, width, array.shape[2]), dtype=array.dtype)
    rows, cols = min(h, height), min(w, width)
    src_top, dst_top = ((h - height) // 2, 0) if h >= height else (0, (height - h + 1) // 2)
    src_left, dst_left = ((w - width) // 2, 0) if w >= width else (0, (width - w + 1) // 2)
    out[dst_top : dst_top + rows, dst_left : dst_left + cols] = array[
        src_top : src_top + rows, src_left : src_left + cols
    ]
    return out
