"""The demo's embedded data: a class-balanced Fashion-MNIST subset shipped in the repository.

``fashion_mnist_subset.npz`` holds the first 600 training and the first 100 test images of every
class, in file order, from the original Fashion-MNIST release (Zalando Research, MIT licence; see
``LICENSE`` and ``README.md`` here). ``build_subset`` regenerates it byte for byte from Debian's
``dataset-fashion-mnist`` package (or any copy of the four original ``*-ubyte.gz`` files).

The demo does not read the arrays directly: ``materialize_fashion_mnist`` writes them out as class
folders of grayscale PNGs, so they enter training through ``dataset.images.ImageFolderDataset``
like any user's images (counted grayscale -> RGB conversion, ADM crop upsampling to 32 px).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
from PIL import Image

SUBSET_PATH = Path(__file__).with_name("fashion_mnist_subset.npz")
# FID Inception features (pool, spatial) of the demo's held-out reference batch; see README.md.
HELDOUT_FEATURES_PATH = Path(__file__).with_name("heldout_inception_features.npz")
DEBIAN_SOURCE = Path("/usr/share/datasets/fashion-mnist")
# Names as in Zalando's README, in label order.
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_SOURCE_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_MARKER = ".fashion_mnist.json"


def class_folder_name(label: int, name: str) -> str:
    """``0, "T-shirt/top" -> "00_tshirt_top"``: sorted folder order equals label order."""
    slug = "".join(c if c.isalnum() else "_" for c in name.lower().replace("-", ""))
    return f"{label:02d}_{slug}"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (the MNIST container: big-endian magic, dims, then uint8 data), gzipped or not."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {body.size} bytes of data for shape {shape}")
    return body.reshape(shape)


def _first_per_class(labels: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
    chosen = []
    for label in range(num_classes):
        where = np.flatnonzero(labels == label)[:per_class]
        if len(where) < per_class:
            raise ValueError(f"class {label} has only {len(where)} images, {per_class} requested")
        chosen.append(where)
    return np.sort(np.concatenate(chosen))  # keep the source file order


def build_subset(
    source_dir: str | os.PathLike = DEBIAN_SOURCE,
    out_path: str | os.PathLike = SUBSET_PATH,
    train_per_class: int = 600,
    test_per_class: int = 100,
) -> Path:
    """Write the subset npz from the original files: the first ``*_per_class`` images of each class."""
    source_dir = Path(source_dir)
    arrays: dict[str, np.ndarray] = {"class_names": np.array(CLASS_NAMES)}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        image_file, label_file = _SOURCE_FILES[split]
        images = read_idx(source_dir / image_file)  # (N, 28, 28) uint8
        labels = read_idx(source_dir / label_file).astype(np.int64)  # (N,)
        keep = _first_per_class(labels, per_class, len(CLASS_NAMES))
        arrays[f"{split}_images"] = images[keep]
        arrays[f"{split}_labels"] = labels[keep]
        arrays[f"{split}_source_index"] = keep.astype(np.int64)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, **arrays)
    return out_path


def load_subset(split: str = "train", path: str | os.PathLike = SUBSET_PATH) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of the shipped subset."""
    if split not in _SOURCE_FILES:
        raise ValueError(f"split must be one of {tuple(_SOURCE_FILES)}, got {split!r}")
    with np.load(path, allow_pickle=False) as data:
        return data[f"{split}_images"], data[f"{split}_labels"]


def materialize_fashion_mnist(
    out_dir: str | os.PathLike,
    split: str = "train",
    limit_per_class: int | None = None,
) -> Path:
    """Write ``out_dir/<NN_class>/<NNNNN>.png`` (grayscale 28x28) and return ``out_dir``.

    Re-running with the same arguments returns the existing folder (a marker records them); the tree
    is built in a temporary sibling and renamed, so an interrupted run leaves no partial folder.
    """
    out_dir = Path(out_dir)
    request = {"split": split, "limit_per_class": limit_per_class}
    marker = out_dir / _MARKER
    if marker.is_file() and json.loads(marker.read_text(encoding="utf-8")) == request:
        return out_dir
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists but is not a Fashion-MNIST folder made with {request}")
    images, labels = load_subset(split)
    tmp = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    folders = [class_folder_name(i, name) for i, name in enumerate(CLASS_NAMES)]
    for folder in folders:
        (tmp / folder).mkdir(parents=True)
    written = [0] * len(CLASS_NAMES)
    for index, (image, label) in enumerate(zip(images, labels)):
        if limit_per_class is not None and written[label] >= limit_per_class:
            continue
        Image.fromarray(image).save(tmp / folders[label] / f"{index:05d}.png")
        written[label] += 1
    (tmp / _MARKER).write_text(json.dumps(request) + "\n", encoding="utf-8")
    os.replace(tmp, out_dir)
    return out_dir
