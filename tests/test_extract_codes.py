"""tokenizer.extract_codes: shards equal a direct encode, bad files are counted, resume is exact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.codes import CodeDataset, completed_shards, read_manifest, shard_files
from dataset.images import CenterCrop, TenCrop, scan_image_folder
from tests.extraction_testing import IMAGE_SIZE, make_image_folder, make_tokenizer, run_module
from tokenizer.extract_codes import main, parse_args
from tokenizer.model import DARTokenizer

BAD = "c1/img_002.png"


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("extract")
    return {"images": make_image_folder(root / "images", bad=BAD), "tokenizer": make_tokenizer(root / "tokenizer")}


def extract(assets: dict[str, Path], out: Path, *extra: str) -> dict | None:
    argv = ["--tokenizer-ckpt", str(assets["tokenizer"]), "--data-path", str(assets["images"]), "--out", str(out),
            "--image-size", str(IMAGE_SIZE), "--batch-size", "2", "--shard-size", "3", "--num-workers", "0",
            "--device", "cpu", *extra]
    return main(parse_args(argv))


def read_all(out: Path) -> dict[str, np.ndarray]:
    manifest = read_manifest(out)
    arrays = {"codes": [], "labels": [], "indices": []}
    for shard in manifest["shards"]:
        arrays["codes"].append(np.load(out / shard["file"]))
        arrays["labels"].append(np.load(out / shard["labels"]))
        arrays["indices"].append(np.load(out / shard["indices"]))
    return {k: np.concatenate(v) for k, v in arrays.items()}


def direct_codes(assets: dict[str, Path], transform, flip: bool) -> tuple[torch.Tensor, list[int], list[int]]:
    """Encode every good image straight through the tokenizer: (good, A, N) codes, labels, indices."""
    tokenizer = DARTokenizer.from_pretrained(assets["tokenizer"])
    files, labels, _ = scan_image_folder(assets["images"])
    good = [i for i, f in enumerate(files) if f.relative_to(assets["images"]).as_posix() != BAD]
    images = torch.stack([transform(Image.open(files[i]).convert("RGB"), torch.Generator()) for i in good])
    if images.dim() == 4:
        images = images.unsqueeze(1)  # (B, 1, 3, H, W)
    if flip:
        images = torch.cat([images, images.flip(-1)], dim=1)
    codes = tokenizer.encode(images.flatten(0, 1)).view(len(good), images.shape[1], -1)
    return codes, [labels[i] for i in good], good


def test_flip_extraction_equals_direct_encode_and_counts_the_bad_file(assets: dict[str, Path], tmp_path: Path) -> None:
    manifest = extract(assets, tmp_path / "codes", "--flip")
    assert manifest == read_manifest(tmp_path / "codes")
    expected, labels, good = direct_codes(assets, CenterCrop(IMAGE_SIZE), flip=True)
    assert len(set(expected[:, 0].flatten().tolist())) > 8, "degenerate tokenizer: codes ignore the image"
    assert manifest["num_items"] == len(good) == 12
    assert (manifest["num_augs"], manifest["seq_len"], manifest["vocab_size"]) == (2, 16, 64)
    assert [s["count"] for s in manifest["shards"]] == [3, 3, 2, 3, 1]  # shard 2 lost the bad file
    meta = manifest["meta"]
    assert meta["bad_files"]["seen"] == 13 and meta["bad_files"]["skipped/not_image"] == 1
    assert meta["bad_files"]["skipped"] == 1 and meta["classes"] == ["c0", "c1", "c2"]
    arrays = read_all(tmp_path / "codes")
    assert arrays["indices"].tolist() == good
    assert arrays["labels"].tolist() == labels
    assert arrays["codes"].dtype == np.int16
    torch.testing.assert_close(torch.from_numpy(arrays["codes"].astype(np.int64)), expected, rtol=0, atol=0)
    # The training dataset reads exactly these rows.
    dataset = CodeDataset(tmp_path / "codes")
    row, label = dataset[7]
    assert label == labels[7] and row.tolist() in expected[7].tolist()


def test_ten_crop_extraction_equals_direct_encode(assets: dict[str, Path], tmp_path: Path) -> None:
    manifest = extract(assets, tmp_path / "codes", "--ten-crop", "--shard-size", "100")
    expected, _, _ = direct_codes(assets, TenCrop(IMAGE_SIZE, 1.1), flip=False)
    assert manifest["num_augs"] == 10 and len(manifest["shards"]) == 1
    codes = torch.from_numpy(read_all(tmp_path / "codes")["codes"].astype(np.int64))
    torch.testing.assert_close(codes, expected, rtol=0, atol=0)


def test_killed_extraction_resumes_without_duplicates_or_gaps(assets: dict[str, Path], tmp_path: Path) -> None:
    full = tmp_path / "full"
    extract(assets, full)
    part = tmp_path / "part"
    assert extract(assets, part, "--max-shards", "2") is None  # stopped early: no manifest yet
    assert completed_shards(part) == [0, 1] and not (part / "manifest.json").exists()
    # A kill while shard 1 was being written leaves its labels/indices but no codes file.
    (part / shard_files(1)["file"]).unlink()
    assert extract(assets, part, "--max-shards", "1") is None
    assert completed_shards(part) == [0, 1]
    manifest = extract(assets, part)
    assert manifest["shards"] == read_manifest(full)["shards"]
    assert manifest["meta"]["bad_files"] == read_manifest(full)["meta"]["bad_files"]
    a, b = read_all(full), read_all(part)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert len(np.unique(b["indices"])) == len(b["indices"]) == 12


def test_rerun_with_other_settings_is_refused(assets: dict[str, Path], tmp_path: Path) -> None:
    extract(assets, tmp_path / "codes", "--max-shards", "1")
    with pytest.raises(ValueError, match="other settings.*views"):
        extract(assets, tmp_path / "codes", "--flip")
    settings = json.loads((tmp_path / "codes" / "extraction.json").read_text())
    assert settings["views"] == "center" and settings["shard_size"] == 3


def test_ten_crop_and_flip_are_exclusive() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--tokenizer-ckpt", "t", "--data-path", "d", "--out", "o", "--ten-crop", "--flip"])


@pytest.mark.slow
def test_two_rank_torchrun_extraction_equals_one_process(assets: dict[str, Path], tmp_path: Path) -> None:
    extract(assets, tmp_path / "one", "--flip")
    args = ["--tokenizer-ckpt", str(assets["tokenizer"]), "--data-path", str(assets["images"]),
            "--out", str(tmp_path / "two"), "--image-size", str(IMAGE_SIZE), "--batch-size", "2",
            "--shard-size", "3", "--num-workers", "1", "--flip", "--device", "cpu"]
    run_module("tokenizer.extract_codes", args, nproc=2)
    assert read_manifest(tmp_path / "two")["shards"] == read_manifest(tmp_path / "one")["shards"]
    a, b = read_all(tmp_path / "one"), read_all(tmp_path / "two")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
