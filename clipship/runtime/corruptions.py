"""FusionBench's seven image corruptions (Hendrycks & Dietterich, "Benchmarking Neural Network
Robustness to Common Corruptions and Perturbations", ICLR 2019), seeded, at any image size.

The definitions are the paper's; the severity tables are the CIFAR-10-C ones FusionBench's
``make_corruption.py`` uses, so data corrupted here matches the kind of the hub's corrupted
splits (``tanganke/{stanford_cars,eurosat,resisc45,gtsrb}``, split = corruption name), which
that script made. Two differences, both deliberate:

- ``pixelate`` shrinks an image by the severity's factor *of its own size* and back; the
  FusionBench script resizes every image to 32×32 (it was written for CIFAR), which is why the
  hub's ``pixelate`` splits hold 32×32 images.
- ``spatter``'s water drops (severities 1–3) find the drops' edges with a Sobel filter and
  SciPy's Euclidean distance transform where the reference uses OpenCV's Canny detector and
  distance transform: the same construction, not the same pixels. Mud (4–5) is as published.

Every random draw comes from a generator seeded by (seed, corruption, severity, task, image
index), so an image's corruption is the same bytes whatever the batch, worker or order.
No maintained library implements these definitions for arbitrary sizes today:
``imagecorruptions`` (1.1.2, 2020) imports ``pkg_resources`` (gone from current setuptools)
and SciPy's removed ``ndimage.interpolation``; ``imagenet_c`` needs ImageMagick (Wand). So they
are written here with NumPy, SciPy and Pillow, checked against the definitions in the tests.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

CORRUPTIONS = (
    "contrast",
    "gaussian_noise",
    "impulse_noise",
    "jpeg_compression",
    "motion_blur",
    "pixelate",
    "spatter",
)
SEVERITIES = range(1, 6)
# The hub datasets that ship one test split per corruption (FusionBench's robustness taskpool).
HUB_CORRUPTED = (
    "tanganke/stanford_cars",
    "tanganke/eurosat",
    "tanganke/resisc45",
    "tanganke/gtsrb",
)

GAUSSIAN_NOISE = (0.04, 0.06, 0.08, 0.09, 0.10)  # σ on [0, 1] pixels
IMPULSE_NOISE = (0.01, 0.02, 0.03, 0.05, 0.07)  # fraction of values set to 0 or 1
CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # scale of the deviation from each channel's mean
JPEG_QUALITY = (80, 65, 58, 50, 40)
PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # the size factor of the shrunken image
MOTION_BLUR = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))  # (radius, σ) in pixels
# (mean, std, blur σ, threshold, intensity or mud blur σ, mud?)
SPATTER = (
    (0.62, 0.1, 0.7, 0.7, 0.5, False),
    (0.65, 0.1, 0.8, 0.7, 0.5, False),
    (0.65, 0.3, 1.0, 0.69, 0.5, False),
    (0.65, 0.1, 0.7, 0.69, 0.6, True),
    (0.65, 0.1, 0.5, 0.68, 0.6, True),
)


@dataclass(frozen=True)
class Corruption:
    """One corruption at one severity for one task's images (picklable: DataLoader workers)."""

    name: str
    severity: int
    seed: int = 0
    task: str = ""

    def __call__(self, image: Image.Image, index: int) -> Image.Image:
        keys = [self.seed, self.severity, zlib.crc32(self.name.encode()), index]
        keys.insert(3, zlib.crc32(self.task.encode()))
        rng = np.random.default_rng(np.random.SeedSequence(keys))
        return corrupt(image, self.name, self.severity, rng)


def corrupt(image: Image.Image, name: str, severity: int, rng: np.random.Generator) -> Image.Image:
    """``image`` (any mode, any size) corrupted, as an RGB image of the same size."""
    rgb = image.convert("RGB")
    level = severity - 1
    if name == "jpeg_compression":
        buffer = io.BytesIO()
        rgb.save(buffer, "JPEG", quality=JPEG_QUALITY[level])
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    if name == "pixelate":
        factor = PIXELATE[level]
        small = (max(1, int(rgb.width * factor)), max(1, int(rgb.height * factor)))
        return rgb.resize(small, Image.BOX).resize(rgb.size, Image.BOX)
    x = np.asarray(rgb, dtype=np.float64) / 255.0
    if name == "gaussian_noise":
        x = x + rng.normal(scale=GAUSSIAN_NOISE[level], size=x.shape)
    elif name == "impulse_noise":
        hit = rng.random(x.shape) < IMPULSE_NOISE[level]
        salt = rng.random(x.shape) < 0.5
        x = np.where(hit, salt.astype(np.float64), x)
    elif name == "contrast":
        means = x.mean(axis=(0, 1), keepdims=True)
        x = (x - means) * CONTRAST[level] + means
    elif name == "motion_blur":
        radius, sigma = MOTION_BLUR[level]
        x = _motion_blur(x, radius, sigma, rng.uniform(-45, 45))
    elif name == "spatter":
        x = _spatter(x, SPATTER[level], rng)
    else:
        raise ValueError(f"unknown corruption {name!r}")
    # Like the reference: values clipped to [0, 1], scaled, truncated to 8 bits.
    return Image.fromarray((np.clip(x, 0, 1) * 255).astype(np.uint8), "RGB")


def _motion_blur(x: np.ndarray, radius: int, sigma: float, angle: float) -> np.ndarray:
    """ImageMagick's motion blur: each pixel averages the 2·radius+1 pixels behind it along
    ``angle`` (degrees), weighted by a one-sided Gaussian of σ; edges repeat."""
    steps = np.arange(2 * radius + 1)
    weights = np.exp(-(steps**2) / (2 * sigma**2))
    weights /= weights.sum()
    theta = np.deg2rad(angle)
    dx, dy = np.rint(steps * np.cos(theta)).astype(int), np.rint(steps * np.sin(theta)).astype(int)
    h, w = x.shape[:2]
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    out = np.zeros_like(x)
    for weight, ox, oy in zip(weights, dx, dy):
        out += weight * x[np.clip(rows - oy, 0, h - 1), np.clip(cols - ox, 0, w - 1)]
    return out


def _spatter(x: np.ndarray, c: tuple, rng: np.random.Generator) -> np.ndarray:
    from scipy import ndimage

    mean, std, blur, threshold, strength, mud = c
    liquid = ndimage.gaussian_filter(rng.normal(mean, std, size=x.shape[:2]), blur, mode="nearest")
    liquid[liquid < threshold] = 0
    if mud:  # brown mud where the blurred drop mask is nearly full
        mask = ndimage.gaussian_filter((liquid > threshold).astype(np.float64), strength)
        mask[mask < 0.8] = 0
        brown = np.array([63, 42, 20]) / 255.0
        return x * (1 - mask[..., None]) + brown * mask[..., None]
    # water: pale turquoise drops, shaded by the distance to their edges (embossed)
    layer = np.floor(liquid * 255)
    edges = np.hypot(ndimage.sobel(layer, 0), ndimage.sobel(layer, 1)) > 50
    dist = np.minimum(ndimage.distance_transform_edt(~edges), 20)
    dist = ndimage.uniform_filter(dist, 3, mode="nearest")
    dist = _equalize(np.floor(dist).astype(np.uint8)).astype(np.float64)
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]], dtype=np.float64)
    dist = np.clip(ndimage.correlate(dist, emboss, mode="nearest"), 0, 255)
    dist = ndimage.uniform_filter(dist, 3, mode="nearest")
    shade = liquid * dist
    peak = shade.max()
    shade = shade / peak * strength if peak > 0 else shade
    turquoise = np.array([175, 238, 238]) / 255.0
    return x + shade[..., None] * turquoise


def _equalize(values: np.ndarray) -> np.ndarray:
    """Histogram equalisation of 8-bit values (OpenCV's rule: the cumulative histogram,
    shifted so the smallest value maps to 0, scaled to 255)."""
    counts = np.bincount(values.reshape(-1), minlength=256)
    cdf = np.cumsum(counts)
    low = cdf[np.nonzero(counts)[0][0]]
    total = cdf[-1]
    if total == low:
        return values
    table = np.rint((cdf - low) * 255.0 / (total - low)).clip(0, 255).astype(np.uint8)
    return table[values]
