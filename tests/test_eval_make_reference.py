"""make_reference: ADM centre crops in folder order, stored statistics of exactly those crops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from dataset.images import center_crop_arr
from evaluations.evaluator import extract_features, open_npz_array, read_statistics
from evaluations.inception import load_fid_inception
from evaluations.make_reference import _subset_indices, main
from evaluations.metrics import feature_statistics


def test_subset_is_seeded_sorted_and_complete_when_small() -> None:
    assert _subset_indices(5, 10, seed=0) == [0, 1, 2, 3, 4]
    chosen = _subset_indices(100, 10, seed=3)
    assert chosen == sorted(chosen) and len(set(chosen)) == 10
    assert chosen == _subset_indices(100, 10, seed=3) != _subset_indices(100, 10, seed=4)


def test_reference_batch_from_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    paths = [folder / "a.png", folder / "b.jpg", folder / "sub" / "c.png"]
    for path, (h, w) in zip(paths, [(40, 60), (90, 70), (24, 30)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    (folder / "broken.png").write_bytes(b"not an image")

    summary = main(["--data-path", str(folder), "--out", str(tmp_path / "ref.npz"), "--image-size", "32",
                    "--device", "cpu", "--num-workers", "0", "--batch-size", "2"])
    assert summary["num_images"] == 3 and summary["skipped"] == 1
    images = np.asarray(open_npz_array(tmp_path / "ref.npz"))
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    for got, path in zip(images, sorted(paths, key=lambda p: p.relative_to(folder).as_posix())):
        with Image.open(path) as image:
            np.testing.assert_array_equal(got, center_crop_arr(image.convert("RGB"), 32))

    stats = read_statistics(tmp_path / "ref.npz")
    feats = extract_features(load_fid_inception(None, device="cpu"), images)
    for (mu, sigma), key in ((feature_statistics(feats["pool"]), ""), (feature_statistics(feats["spatial"]), "_s")):
        np.testing.assert_allclose(stats[f"mu{key}"], mu, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[f"sigma{key}"], sigma, rtol=1e-4, atol=1e-6)


def test_default_batch_size_works(tmp_path: Path) -> None:
    # Without --batch-size the loader used to get batch_size=None (no batching) and fail in collation.
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / name)
    summary = main(["--data-path", str(folder), "--out", str(tmp_path / "ref.npz"), "--image-size", "16",
                    "--device", "cpu", "--num-workers", "0"])
    assert summary["num_images"] == 2 and open_npz_array(tmp_path / "ref.npz").shape == (2, 16, 16, 3)
