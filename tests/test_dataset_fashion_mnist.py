"""The shipped Fashion-MNIST subset and its materialisation as an ordinary image folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.fashion_mnist import (
    CLASS_NAMES,
    DEBIAN_SOURCE,
    SUBSET_PATH,
    build_subset,
    load_subset,
    materialize_fashion_mnist,
)
from dataset.images import CenterCrop, ImageFolderDataset, collate_skip_bad


def test_shipped_subset_is_balanced_and_small() -> None:
    assert SUBSET_PATH.stat().st_size < 10 * 2**20
    for split, per_class in (("train", 600), ("test", 100)):
        images, labels = load_subset(split)
        assert images.dtype == np.uint8 and images.shape == (10 * per_class, 28, 28)
        assert labels.dtype == np.int64
        assert np.bincount(labels, minlength=10).tolist() == [per_class] * 10
        assert images.std() > 50  # real garments, not blank arrays
    with np.load(SUBSET_PATH, allow_pickle=False) as data:
        assert tuple(data["class_names"].tolist()) == CLASS_NAMES


@pytest.mark.skipif(not DEBIAN_SOURCE.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_subset_rebuilds_byte_for_byte(tmp_path: Path) -> None:
    rebuilt = build_subset(DEBIAN_SOURCE, tmp_path / "subset.npz")
    assert rebuilt.read_bytes() == SUBSET_PATH.read_bytes()


def test_materialized_folder_goes_through_the_normal_dataset(tmp_path: Path) -> None:
    root = materialize_fashion_mnist(tmp_path / "train", "train", limit_per_class=3)
    dataset = ImageFolderDataset(root, CenterCrop(32))
    assert dataset.classes[:2] == ("00_tshirt_top", "01_trouser") and dataset.classes[-1] == "09_ankle_boot"
    assert len(dataset) == 30 and dataset.labels.tolist() == sorted(dataset.labels.tolist())
    images, labels = load_subset("train")
    first = dataset.files[0]
    np.testing.assert_array_equal(np.asarray(Image.open(first)), images[int(first.stem)])
    assert labels[int(first.stem)] == 0
    batch = collate_skip_bad([dataset[i] for i in range(len(dataset))])
    assert batch.images.shape == (30, 3, 32, 32)
    assert batch.stats.conversions["grayscale"] == 30 and batch.stats.num_skipped == 0
    assert torch.equal(batch.images[:, 0], batch.images[:, 1])
    assert batch.labels.tolist() == [i // 3 for i in range(30)]


def test_materialize_is_idempotent_and_refuses_foreign_folders(tmp_path: Path) -> None:
    root = materialize_fashion_mnist(tmp_path / "test", "test", limit_per_class=1)
    stamp = sorted(p.stat().st_mtime_ns for p in root.rglob("*.png"))
    assert materialize_fashion_mnist(tmp_path / "test", "test", limit_per_class=1) == root
    assert sorted(p.stat().st_mtime_ns for p in root.rglob("*.png")) == stamp
    with pytest.raises(FileExistsError):
        materialize_fashion_mnist(tmp_path / "test", "test", limit_per_class=2)
    with pytest.raises(ValueError, match="split"):
        materialize_fashion_mnist(tmp_path / "other", "val")
